"""Shared test tools: tiny model settings, real gloo processes, tolerant comparisons."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_VIT = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, moco_dim=32,
                moco_mlp_dim=64, moco_t=0.2)
TINY_RESNET = dict(arch="resnet_tiny", img_size=32, moco_dim=32, moco_mlp_dim=64, moco_t=1.0)
TINY_VIT_FLAGS = ["-a", "vit_tiny", "--patch-size", "8", "--embed-dim", "64", "--depth", "2", "--num-heads", "4",
                  "--moco-dim", "32", "--moco-mlp-dim", "64", "--moco-t", "0.2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from moco_scale.dist import init_distributed, shutdown

    ctx = init_distributed("cpu", timeout_s=120)
    try:
        fn(ctx, *args)
    finally:
        shutdown()


def spawn(fn, world: int, *args: Any) -> None:
    """Run fn(ctx, *args) in `world` real processes joined by gloo."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")


def rel_err(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> float:
    """||a - b|| / ||b|| per tensor; `atol` (per element, RMS) absorbs values that are rounding noise."""
    a, b = a.double(), b.double()
    diff = max((a - b).norm().item() - atol * b.numel() ** 0.5, 0.0)
    denom = b.norm().item()
    return diff / denom if denom > 0 else diff


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5,
                        atol: float = 0.0) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    worst = max(((rel_err(got[k], want[k], atol), k) for k in want), default=(0.0, ""))
    assert worst[0] <= rtol, f"{worst[1]} differs by {worst[0]:.2e} (relative)"


def assert_losses_close(got: list[float], want: list[float], rtol: float = 1e-5) -> None:
    assert len(got) == len(want), (got, want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= rtol * abs(w), f"step {i + 1}: loss {g} vs {w}"


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run moco-scale (optionally under a launcher) as a real subprocess; returns the completed process."""
    cmd = (launcher or [str(BIN / "moco-scale")]) + args
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "moco_scale.pretrain"]


def deepspeed_launcher(nproc: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", "moco_scale.pretrain"]
