"""Replicated data parallelism: torch DDP over ranks, or the bare module in one process."""

from __future__ import annotations

from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from moco_scale.dist import DistContext
from moco_scale.engines import dcp
from moco_scale.engines.activation_checkpointing import apply_activation_checkpointing
from moco_scale.engines.base import PRECISIONS, Engine, resolve_precision
from moco_scale.engines.compile import compile_blocks
from moco_scale.models import MoCo
from moco_scale.optim import build_optimizer

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


class DDPEngine(dcp.DCPCheckpoints, Engine):
    """Every rank holds the whole model; gradients are averaged by DDP's all-reduce.

    Parameters stay fp32 (autocast computes in bf16/fp16), so the momentum update is the
    module's own fp32 lerp with no communication: every rank applies the same update.
    """

    name = "ddp"
    DEFAULTS = {"engine": "ddp", "precision": "auto", "bucket_cap_mb": 25.0, "find_unused_parameters": False,
                "activation_checkpointing": 0, "backbone_chunk": 0, "compile": False}
    CHOICES = {"engine": ("ddp",), "precision": PRECISIONS}

    def __init__(self, model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> None:
        self.ctx = ctx
        self.model = model.to(ctx.device)
        self.precision = resolve_precision(config["precision"], ctx.device)
        apply_activation_checkpointing(model, config["activation_checkpointing"])
        compile_blocks(model, config["compile"])
        model.set_backbone_chunk(config["backbone_chunk"])
        self.module: torch.nn.Module = model
        if ctx.is_distributed and ctx.world_size > 1:
            # BN statistics are synced, so buffers agree on every rank without a broadcast. Gradients are views
            # of DDP's all-reduce buckets: one copy of them, not two
            self.module = DistributedDataParallel(
                model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                broadcast_buffers=False, bucket_cap_mb=config["bucket_cap_mb"],
                find_unused_parameters=config["find_unused_parameters"], gradient_as_bucket_view=True)
        self.optimizer = build_optimizer(optimizer, model.trainable_parameters(), weight_decay)
        self.scaler = torch.amp.GradScaler(ctx.device.type, init_scale=2.0**16, growth_interval=2000,
                                           enabled=self.precision == "fp16")

    def update_momentum(self, m: float) -> None:
        self.model.update_momentum(m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = x1.to(self.ctx.device, non_blocking=True)
        x2 = x2.to(self.ctx.device, non_blocking=True)
        dtype = _DTYPES.get(self.precision)
        with torch.autocast(self.ctx.device.type, dtype=dtype, enabled=dtype is not None):
            return self.module(x1, x2)

    def backward(self, loss: torch.Tensor) -> None:
        self.scaler.scale(loss).backward()

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, name: str) -> float:
        grad = self.model.get_parameter(name).grad
        if grad is None:
            return 0.0
        norm = grad.float().norm().item()
        return norm / self.scaler.get_scale() if self.scaler.is_enabled() else norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()

