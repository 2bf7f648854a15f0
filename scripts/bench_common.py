"""What the benchmarks share: one process as a group of one, DeepSpeed kept quiet, the measured bf16 matmul
peak, `--tiny` shapes for `scripts/gpu_check.sh --dry-run` on the CPU, an engine for a model, and the plain
reference step bench_step.py times moco-scale's against. Engines are stepped through
`moco_scale.train.steps.run_steps`; tables are `moco_scale.telemetry.CheckTable`s."""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]

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


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def quiet_deepspeed() -> None:
    try:
        from deepspeed.utils import logger
    except ImportError:
        return
    logger.setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


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


def engine_for(kwargs: dict, cfg, ctx, optimizer: str = "adamw", weight_decay: float = 0.1, seed: int = 0,
               memory_format: torch.memory_format | None = None):
    """An engine for the MoCo model of `kwargs`, built on the meta device and placed by the engine (with a
    `memory_format`, built on the CPU in that format first: the engine keeps the tensors' strides)."""
    from moco_scale import build_moco
    from moco_scale.optim import OptimizerSpec

    if memory_format is None:
        model = build_moco(**kwargs, seed=seed, device="meta")
    else:
        model = build_moco(**kwargs, seed=seed).to(memory_format=memory_format)
    return cfg.build(model, OptimizerSpec(optimizer, weight_decay), ctx)


class PlainStep:
    """The reference's iteration as a plain script writes it, for timing (bench_step.py): no engine, torch's
    default AdamW, the base encoder run per view, the momentum update before the keys, InfoNCE with
    labels = arange. (The test suite's oracle, tests/reference.py, is the independent one that checks values.)"""

    def __init__(self, kwargs: dict, lr: float = 1e-4, m: float = 0.99, seed: int = 0) -> None:
        from moco_scale import build_moco

        model = build_moco(**kwargs, seed=seed)
        self.base, self.momentum, self.predictor = model.base_encoder, model.momentum_encoder, model.predictor
        self.T, self.m = model.temperature, m
        params = [p for p in (*self.base.parameters(), *self.predictor.parameters()) if p.requires_grad]
        self.optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.1)

    def _infonce(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        q, k = torch.nn.functional.normalize(q, dim=1), torch.nn.functional.normalize(k, dim=1)
        logits = q @ k.t() / self.T
        return torch.nn.functional.cross_entropy(logits, torch.arange(q.shape[0])) * 2 * self.T

    def __call__(self, x1: torch.Tensor, x2: torch.Tensor) -> float:
        with torch.no_grad():
            for b, m in zip(self.base.parameters(), self.momentum.parameters(), strict=True):
                m.mul_(self.m).add_(b, alpha=1 - self.m)
        q1, q2 = self.predictor(self.base(x1)), self.predictor(self.base(x2))
        with torch.no_grad():
            k1, k2 = self.momentum(x1), self.momentum(x2)
        loss = self._infonce(q1, k2) + self._infonce(q2, k1)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.item()
