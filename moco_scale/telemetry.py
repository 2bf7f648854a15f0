"""Run output on rank 0: tqdm progress on a terminal, one plain line per logged step elsewhere (a SLURM log,
nohup, a file), metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import sys
import time
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
                 terminal: bool | None = None) -> None:
        self.enabled, self.total = enabled, total_steps
        self.plain = not (sys.stderr.isatty() if terminal is None else terminal)
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled or self.plain,
                        dynamic_ncols=True, desc="pretrain", unit="step", mininterval=1.0)
        self.jsonl = self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            path = os.path.join(out_dir, "metrics.jsonl")
            _drop_after(path, initial_step)  # a resume from an earlier step: the abandoned steps' lines go
            self.jsonl = open(path, "a")
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                self.tb.add_scalar(f"train/{key}", value, metrics["step"])
        postfix = {"loss": f"{metrics['loss']:.4f}", "lr": f"{metrics['lr']:.2e}", "m": f"{metrics['moco_m']:.4f}",
                   "img/s": f"{metrics['img_per_s']:.1f}", "/rank": f"{metrics['img_per_s_per_rank']:.1f}",
                   "data": f"{100 * metrics['data_wait_frac']:.0f}%", "mem": f"{metrics['peak_mem_gib']:.1f}G"}
        if metrics.get("mfu") is not None:
            postfix["mfu"] = f"{100 * metrics['mfu']:.1f}%"
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
