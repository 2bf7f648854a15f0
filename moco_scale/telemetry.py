"""Run output on rank 0: tqdm progress on a terminal, one plain line per logged step elsewhere (a SLURM log,
nohup, a file), metrics.jsonl and TensorBoard."""

from __future__ import annotations

import gc
import json
import os
import resource
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm import tqdm


def _drop_after(path: str, step: int) -> None:
    """Keep the lines of metrics.jsonl up to `step` (a run resumed there continues its own history)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    kept = []
    for line in lines:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue  # a line cut by a crash
    if len(kept) != len(lines):
        tmp = f"{path}.tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)


class RunLogger:
    """Writes one JSON object per logged step and mirrors it to TensorBoard and the progress bar.

    Ranks other than 0 get a disabled logger, so the driver calls it unconditionally. The bar redraws only
    on a terminal: where stderr is not one, each logged step prints one line instead of carriage returns.
    """

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, initial_step: int = 0,
                 terminal: bool | None = None, desc: str = "pretrain") -> None:
        self.enabled, self.total = enabled, total_steps
        self.plain = not (sys.stderr.isatty() if terminal is None else terminal)
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled or self.plain,
                        dynamic_ncols=True, desc=desc, unit="step", mininterval=1.0)
        self.jsonl = self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(out_dir, "metrics.jsonl")
            _drop_after(path, initial_step)  # a resume from an earlier step: the abandoned steps' lines go
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def advance(self) -> None:
        self.bar.update(1)

    def _write(self, metrics: dict[str, Any], group: str) -> None:
        self.jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"{group}/{key}", value, metrics["step"])

    def log_eval(self, metrics: dict[str, Any]) -> None:
        """An evaluation's results at a step (TensorBoard's eval/ group), and one line."""
        if not self.enabled:
            return
        self._write(metrics, "eval")
        shown = " ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items()
                         if k not in ("step", "epoch"))
        self.message(f"eval at step {metrics['step']}: {shown}")

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self._write(metrics, "train")
        shown = {"loss": ("loss", ".4f", 1), "lr": ("lr", ".2e", 1), "moco_m": ("m", ".4f", 1),
                 "img_per_s": ("img/s", ".1f", 1), "img_per_s_per_rank": ("/rank", ".1f", 1),
                 "data_wait_frac": ("data", ".0f", 100), "peak_mem_gib": ("mem", ".1f", 1), "mfu": ("mfu", ".1f", 100)}
        postfix = {label: f"{scale * metrics[key]:{fmt}}" for key, (label, fmt, scale) in shown.items()
                   if metrics.get(key) is not None}
        for label in ("data", "mfu"):
            if label in postfix:
                postfix[label] += "%"
        if "mem" in postfix:
            postfix["mem"] += "G"
        if self.plain:
            eta = time.strftime("%H:%M:%S", time.gmtime(metrics["eta_s"]))
            fields = " ".join(f"{k} {v}" for k, v in postfix.items() if k != "/rank")
            self.message(f"step {metrics['step']}/{self.total} {fields} eta {eta}")
        else:
            self.bar.set_postfix(postfix, refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            tqdm.write(text, file=sys.stdout)
            sys.stdout.flush()

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class Throughput:
    """Speed between two logs: images/s in total and per rank, the share of time spent waiting for data,
    MFU (model FLOPs over the device's peak, where known), this rank's peak memory, time left."""

    def __init__(self, world: int, device: torch.device, flops_per_image: float, peak_tflops: float | None,
                 total_steps: int, done_steps: int) -> None:
        self.world, self.device = world, device
        self.flops_per_image, self.peak = flops_per_image, peak_tflops
        self.steps_left = total_steps - done_steps
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = self.steps = 0
        self.data_wait = 0.0
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.steps += 1
        self.steps_left -= 1
        self.data_wait += data_wait

    def read(self) -> dict[str, float | None]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        img_s = self.images / elapsed
        achieved = img_s * self.flops_per_image / self.world  # FLOP/s per rank
        out = {"img_per_s": img_s, "img_per_s_per_rank": img_s / self.world, "data_wait_frac": self.data_wait / elapsed,
               "tflops_per_rank": achieved / 1e12, "mfu": achieved / (self.peak * 1e12) if self.peak else None,
               "peak_mem_gib": peak_memory_gib(self.device),
               "eta_s": self.steps_left * elapsed / max(self.steps, 1)}
        self.reset()
        return out


def peak_memory_gib(device: torch.device) -> float:
    """Peak since the last reset on CUDA (allocated by torch); on CPU the process's peak resident size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class CheckTable:
    """A Markdown table printed row by row, every row its own try (an error goes into its row, never ends the
    table), within a time budget: stdout, flushed, so that scripts/gpu_check.sh keeps the lines starting with '#'
    or '|' of a stage stopped by its time limit; `row` runs one measurement or check."""

    def __init__(self, title: str, columns: Sequence[str], budget_s: float = float("inf")) -> None:
        self.columns, self.deadline = list(columns), time.monotonic() + budget_s
        self._emit(f"# {title}")
        self._emit("| " + " | ".join(columns) + " |")
        self._emit("|" + "---|" * len(columns))
        self.failed = 0

    @staticmethod
    def _emit(line: str) -> None:
        print(line, flush=True)

    def row(self, key: Sequence[object], measure: Callable[[], Sequence[object]]) -> None:
        """`key` fills the first columns, `measure()` the rest; an exception or the budget is written in the row."""
        blank = [""] * (len(self.columns) - len(key) - 1)
        if time.monotonic() > self.deadline:
            self._emit("| " + " | ".join(map(str, [*key, "skipped: time budget", *blank])) + " |")
            return
        free_device_memory()  # each row's peak memory is its own
        try:
            values = list(measure())
        except torch.OutOfMemoryError:
            values = ["OOM", *blank]
        except Exception as e:  # noqa: BLE001 - a failed row is reported and the next one runs
            self.failed += 1
            traceback.print_exc(file=sys.stderr)
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            values = [f"error: {type(e).__name__}: {first[:100]}".replace("|", "/"), *blank]
        self._emit("| " + " | ".join(map(str, [*key, *values])) + " |")
