"""`moco-scale report DIR`: PNG plots and a Markdown summary of a pretraining run.

Reads what the run wrote (metrics.jsonl, config.json, summary.json) and nothing else, so it
works on a finished, interrupted or still-running run, on any machine.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

#: one PNG per panel: (file, title, y label, metrics keys plotted)
PANELS = (
    ("loss.png", "loss", "2 tau x InfoNCE, both views summed", ("loss",)),
    ("lr.png", "learning rate", "lr", ("lr",)),
    ("momentum.png", "momentum coefficient m", "m", ("moco_m",)),
    ("throughput.png", "throughput", "images/s", ("img_per_s", "img_per_s_per_rank")),
    ("memory.png", "peak memory per rank", "GiB", ("peak_mem_gib",)),
    ("grad_norm.png", "first-layer gradient norm", "L2 norm", ()),  # keys found in the file (grad_norm/*)
    ("knn.png", "kNN top-1 on frozen features (--knn-every)", "top-1 %",
     ("knn_top1", "momentum_knn_top1", "knn200_top1", "momentum_knn200_top1")),
)


class ReportError(ValueError):
    pass


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ReportError(f"{path} does not exist: is {run_dir} a moco-scale pretrain output folder?")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if n == len(path.read_text().splitlines()):  # a run killed while writing its last line
                break
            raise ReportError(f"{path} line {n} is not JSON ({e.msg})") from None
    if not any("loss" in r for r in rows):
        raise ReportError(f"{path} holds no logged step yet (the run logs every -p/--print-freq steps)")
    return rows


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text()) if path.is_file() else {}
    except json.JSONDecodeError as e:
        raise ReportError(f"{path} is not JSON ({e.msg})") from None


def plot(rows: list[dict[str, Any]], out_dir: Path) -> list[str]:
    """One PNG per panel that has data; returns the file names written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    grad_keys = tuple(sorted({k for r in rows for k in r if k.startswith("grad_norm/")}))
    for name, title, ylabel, keys in PANELS:
        keys = keys or grad_keys
        series = {k: [(r["step"], r[k]) for r in rows if isinstance(r.get(k), int | float)] for k in keys}
        series = {k: v for k, v in series.items() if v}
        if not series:
            continue
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        for key, points in series.items():
            ax.plot(*zip(*points, strict=True), marker="." if len(points) < 50 else None, label=key)
        ax.set(title=title, xlabel="step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        if len(series) > 1:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / name)
        plt.close(fig)
        written.append(name)
    return written


def _mean(values: list[float]) -> float | None:
    values = [v for v in values if isinstance(v, int | float) and math.isfinite(v)]
    return statistics.fmean(values) if values else None


def summary_markdown(run_dir: Path, rows: list[dict[str, Any]], pngs: list[str]) -> str:
    config, summary = _read_json(run_dir / "config.json"), _read_json(run_dir / "summary.json")
    args, resolved = config.get("args", {}), config.get("resolved", {})
    evals = [r for r in rows if "knn_top1" in r]
    rows = [r for r in rows if "loss" in r]  # training steps; evaluations are rows of their own
    steady = rows[1:] or rows  # the first interval includes start-up
    fmt = {"mean img/s": _mean([r.get("img_per_s") for r in steady]),
           "mean img/s per rank": _mean([r.get("img_per_s_per_rank") for r in steady]),
           "mean MFU": _mean([r.get("mfu") for r in steady]),
           "mean data wait": _mean([r.get("data_wait_frac") for r in steady]),
           "max peak memory per rank (GiB)": max((r.get("peak_mem_gib") or 0.0 for r in rows), default=None)}
    lines = [f"# moco-scale run: {run_dir.name}", "",
             "| | |", "|---|---|",
             f"| model | {args.get('arch', '?')} ({resolved.get('dataset', args.get('data'))}) |",
             f"| engine | {config.get('engine', {}).get('engine', '?')} ({resolved.get('precision', '?')}), "
             f"world {resolved.get('world_size', '?')} on {resolved.get('device', '?')} |",
             f"| global batch | {args.get('batch_size', '?')} ({resolved.get('per_rank_batch', '?')} per rank) |",
             f"| steps | {rows[-1]['step']} logged of {resolved.get('total_steps', '?')}"
             f"{' (interrupted)' if summary.get('interrupted') else ''} |",
             f"| loss | {rows[0]['loss']:.4f} at step {rows[0]['step']} -> {rows[-1]['loss']:.4f} at step "
             f"{rows[-1]['step']} |"]
    for key, value in fmt.items():
        if value is None:
            continue
        text = f"{100 * value:.1f}%" if key in ("mean MFU", "mean data wait") else f"{value:.2f}"
        lines.append(f"| {key} | {text} |")
    if evals:
        lines.append(f"| kNN top-1 (k=20), base / momentum encoder | {evals[0]['knn_top1']:.2f} / "
                     f"{evals[0].get('momentum_knn_top1', float('nan')):.2f} at step {evals[0]['step']} -> "
                     f"{evals[-1]['knn_top1']:.2f} / {evals[-1].get('momentum_knn_top1', float('nan')):.2f} at step "
                     f"{evals[-1]['step']} |")
    if summary.get("seconds") is not None:
        lines.append(f"| wall time | {summary['seconds'] / 60:.1f} min |")
    lines += ["", *(f"![{p[:-4]}]({p})" for p in pngs), ""]
    return "\n".join(lines)


def write_report(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir else run_dir / "report"
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is {'a file' if run_dir.exists() else 'missing'}: name a run's --output-dir")
    if out.exists() and not out.is_dir():
        raise ReportError(f"--out {out} is a file: name a folder for the plots and report.md")
    rows = read_metrics(run_dir)
    out.mkdir(parents=True, exist_ok=True)
    pngs = plot(rows, out)
    (out / "report.md").write_text(summary_markdown(run_dir, rows, pngs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moco-scale report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", help="a pretrain --output-dir")
    p.add_argument("--out", default=None, help="where to write (default: RUN_DIR/report)")
    args = p.parse_args(argv)
    try:
        out = write_report(args.run_dir, args.out)
    except ReportError as e:
        print(f"moco-scale report: error: {e}", file=sys.stderr)
        return 2
    print(f"moco-scale report: wrote {out / 'report.md'} and {len(list(out.glob('*.png')))} plots")
    return 0


if __name__ == "__main__":
    sys.exit(main())
