"""What the GPU check's scripts share: one process as a group of one, DeepSpeed kept quiet, a table whose
every row is its own try (an error goes into its row, never ends the table), a time budget, the measured
bf16 matmul peak, and `--tiny` shapes for `scripts/gpu_check.sh --dry-run` on the CPU."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

#: the test suite's tiny ViT (32 px, patch 8, dim 64, depth 2): every stage runs on the CPU in seconds
TINY = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, moco_dim=32,
            moco_mlp_dim=64)


def init_single(device: str, port: int):
    """World 1 in a process group (the sharding engines need one), on `device`; DeepSpeed's INFO dumps off."""
    for k, v in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(port)}.items():
        os.environ.setdefault(k, v)
    if device == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    quiet_deepspeed()
    from moco_scale.dist import init_distributed

    return init_distributed(device, 600, require_group=True)


def quiet_deepspeed() -> None:
    try:
        from deepspeed.utils import logger
    except ImportError:
        return
    logger.setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


class Table:
    """A Markdown table printed row by row (stdout, flushed: gpu_check.sh keeps the lines starting with '#' or
    '|', so a stage stopped by its time limit keeps its finished rows); `row` runs one measurement."""

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


def measured_matmul_tflops(device: torch.device, n: int = 8192, reps: int = 20) -> float:
    """Dense bf16 matmul throughput of this device (n^3; on the CPU a small fp32 one, only to run the code)."""
    if device.type != "cuda":
        n, reps, dtype = 256, 3, torch.float32
    else:
        dtype = torch.bfloat16
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e12


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def peak_gib(device: torch.device) -> str:
    return f"{torch.cuda.max_memory_allocated() / 2**30:.1f}" if device.type == "cuda" else "n/a"
