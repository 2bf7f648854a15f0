"""Replicated data parallelism: torch DDP over ranks, or the bare module in one process."""

from __future__ import annotations

import contextlib

import torch
from torch.nn.parallel import DistributedDataParallel

from moco_scale.dist import DistContext
from moco_scale.engines.base import DTYPES, SCALER, resolve_precision
from moco_scale.engines.config import DDPConfig, EngineConfig
from moco_scale.engines.memory import Shapes, numel, optimizer_state, ring
from moco_scale.engines.prepare import materialize_whole, prepare, take_state
from moco_scale.engines.torch_engine import TorchEngine
from moco_scale.models.init import InitialState
from moco_scale.models.parts import TrainModule
from moco_scale.optim import OptimizerSpec


class DDPEngine(TorchEngine):
    """Every rank holds the whole model; gradients are averaged by DDP's all-reduce.

    Parameters stay fp32 (autocast computes in bf16/fp16), so the momentum update is the
    module's own fp32 lerp with no communication: every rank applies the same update.
    """

    name = "ddp"

    def __init__(self, model: TrainModule, optimizer: OptimizerSpec, config: DDPConfig, ctx: DistContext,
                 initial: InitialState | None = None) -> None:
        self.ctx, self.model, self.module = ctx, model, model
        self.precision = resolve_precision(config.precision, ctx.device)
        state = take_state(model, initial)

        def wrap() -> None:
            materialize_whole(model, state, ctx.device)
            if ctx.is_distributed and ctx.world_size > 1:
                # BN statistics are synced, so buffers agree on every rank without a broadcast. Gradients are
                # views of DDP's all-reduce buckets: one copy of them, not two
                self.module = DistributedDataParallel(
                    model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                    broadcast_buffers=False, bucket_cap_mb=config.bucket_cap_mb,
                    find_unused_parameters=config.find_unused_parameters, gradient_as_bucket_view=True)

        prepare(model, config, phased_chunks=False, shard=wrap)
        self._pairs = [(m, b) for _, m, b in model.momentum_pairs()]
        self.optimizer = optimizer.build(model)
        if self.precision == "fp16":
            self.scaler = torch.amp.GradScaler(ctx.device.type, **SCALER)

    def compute(self) -> contextlib.AbstractContextManager:
        dtype = DTYPES[self.precision] if self.precision != "fp32" else None
        return torch.autocast(self.ctx.device.type, dtype=dtype, enabled=dtype is not None)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        if self._pairs:
            torch._foreach_lerp_([p for p, _ in self._pairs], [b for _, b in self._pairs], 1.0 - m)

    # -- the planner's model --------------------------------------------------------------------------
    @classmethod
    def state_bytes(cls, shapes: Shapes, cfg: EngineConfig, world: int, rank: int, precision: str,
                    optimizer: str) -> dict[str, int]:
        """Everything whole, fp32 (autocast computes in 16 bits over fp32 weights)."""
        moments, steps = optimizer_state(optimizer)
        n_t, n_f, n_m = numel(shapes.trainable), numel(shapes.frozen), numel(shapes.momentum)
        return {"parameters": 4 * (n_t + n_f), "gradients": 4 * n_t, "momentum": 4 * n_m,
                "optimizer": 4 * moments * n_t + steps * len(shapes.trainable)}

    @classmethod
    def comm_bytes(cls, shapes: Shapes, cfg: EngineConfig, world: int, precision: str, chunks: int) -> int:
        """One all-reduce of the fp32 gradients."""
        return int(2 * ring(world) * numel(shapes.trainable) * 4)
