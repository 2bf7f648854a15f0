"""Benchmark: peak memory and step time against the per-rank batch, backbone chunking off and on.

    python scripts/bench_chunking.py                                  # ViT-S, 64 px, CPU, one process
    python scripts/bench_chunking.py --device cuda --image-size 224 -a vit_base --batches 256 1024 4096
    python scripts/bench_chunking.py --engine-config ds_configs/fsdp.json   # any engine, world 1

Each setting runs in a fresh process (world 1, AdamW; DDP unless --engine-config). The last
column is `moco-scale plan`'s activation estimate for the same setting, to hold it against the
measured step memory. Memory: on CUDA the peak
allocated during the steps; on CPU the peak RSS during the steps minus the RSS before the first
step (the activations and gradients a step adds on top of the model and optimizer).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from bench_common import engine_for

REPO = Path(__file__).resolve().parents[1]


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def worker(args: argparse.Namespace, batch: int, chunk: int, out: str) -> None:
    from moco_scale.dist import init_distributed
    from moco_scale.engines import load_engine_config
    from moco_scale.train.steps import run_steps

    for key in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    cfg = load_engine_config(args.engine_config, batch, 1).replace(
        backbone_chunk=chunk, activation_checkpointing=args.activation_checkpointing).with_precision(args.precision)
    ctx = init_distributed(args.device, require_group=cfg.needs_process_group)
    device = ctx.device
    engine = engine_for({"arch": args.arch, "img_size": args.image_size, "moco_t": 0.2}, cfg, ctx)
    x1 = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    x2 = torch.randn(batch, 3, args.image_size, args.image_size, device=device)
    run_steps(engine, [(x1, x2)])  # optimizer state exists from here on
    before = _rss_mib()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    try:
        times = [s.seconds for s in run_steps(engine, [(x1, x2)] * args.steps)]
    except torch.OutOfMemoryError:
        Path(out).write_text(json.dumps({"oom": True}))
        return
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - before) / 1024
    Path(out).write_text(json.dumps({"step_s": statistics.median(times), "peak_gib": peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", "--arch", default="vit_small")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    p.add_argument("--batches", nargs="+", type=int, default=[32, 64, 128], help="images per rank")
    p.add_argument("--chunks", nargs="+", type=int, default=[0, 32, 64], help="0: chunking off")
    p.add_argument("--activation-checkpointing", type=int, default=0)
    p.add_argument("--engine-config", default=str(REPO / "ds_configs" / "ddp.json"))
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args()
    print(f"# bench_chunking: {args.arch} {args.image_size}px {args.precision} on {args.device}, "
          f"{Path(args.engine_config).name} world 1, "
          f"median of {args.steps} steps; an image is two crops, so a chunk of K crops covers K/2 images")
    from moco_scale.commands.plan import activation_bytes, activation_profile

    profile = activation_profile({"arch": args.arch, "img_size": args.image_size, "moco_t": 0.2})
    print("| images/rank | chunk K | step s | ms/image | step memory GiB | planned activations GiB |")
    print("|---|---|---|---|---|---|")
    ctx = mp.get_context("spawn")
    for batch in args.batches:
        for chunk in args.chunks:
            if chunk >= 2 * batch:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                out = os.path.join(tmp, "r.json")
                proc = ctx.Process(target=worker, args=(args, batch, chunk, out))
                proc.start()
                proc.join()
                if proc.exitcode != 0 or not os.path.exists(out):
                    print(f"| {batch} | {chunk or 'off'} | failed (exit {proc.exitcode}) | | |", flush=True)
                    continue
                r = json.loads(Path(out).read_text())
            if r.get("oom"):
                print(f"| {batch} | {chunk or 'off'} | OOM | | |", flush=True)
                continue
            planned = activation_bytes(profile, 2 * batch, args.activation_checkpointing, chunk, args.precision)
            print(f"| {batch} | {chunk or 'off'} | {r['step_s']:.3f} | {1000 * r['step_s'] / batch:.1f} "
                  f"| {r['peak_gib']:.2f} | {planned / 2**30:.2f} |", flush=True)


if __name__ == "__main__":
    main()
