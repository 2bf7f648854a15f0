"""Run output on rank 0: tqdm progress, metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import os
import time
from typing import Any

from tqdm import tqdm


class RunLogger:
    """Writes one JSON object per logged step and mirrors it to TensorBoard and the progress bar.

    Ranks other than 0 get a disabled logger, so the driver calls it unconditionally.
    """

    def __init__(self, out_dir: str, enabled: bool, total_steps: int, initial_step: int = 0) -> None:
        self.enabled = enabled
        self.bar = tqdm(total=total_steps, initial=initial_step, disable=not enabled, dynamic_ncols=True,
                        desc="pretrain", unit="step", mininterval=1.0)
        self.jsonl = self.tb = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.jsonl = open(os.path.join(out_dir, "metrics.jsonl"), "a")
            self.tb = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def advance(self) -> None:
        self.bar.update(1)

    def log(self, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({**metrics, "time": time.time()}) + "\n")
        self.jsonl.flush()
        for key, value in metrics.items():
            if key != "step" and isinstance(value, int | float):
                self.tb.add_scalar(f"train/{key}", value, metrics["step"])
        self.bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                             img_s=f"{metrics['img_per_s']:.1f}", refresh=False)

    def message(self, text: str) -> None:
        if self.enabled:
            self.bar.write(text)

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            self.jsonl.close()
            self.tb.close()


class Throughput:
    """Images per second and the share of time spent waiting for data, between two logs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.start = time.perf_counter()
        self.images = 0
        self.data_wait = 0.0

    def add(self, images: int, data_wait: float) -> None:
        self.images += images
        self.data_wait += data_wait

    def read(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {"img_per_s": self.images / elapsed, "data_wait_frac": self.data_wait / elapsed}
        self.reset()
        return out
