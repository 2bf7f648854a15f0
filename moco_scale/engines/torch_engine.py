"""What the two torch engines (DDP and FSDP2) share: autocast or sharded mixed precision with one loss scaler
setting, the optimizer step, gradient norms, evaluation calls, and the DCP checkpoint layout."""

from __future__ import annotations

import contextlib

import torch
from torch.distributed.tensor import DTensor

from moco_scale.engines import dcp
from moco_scale.engines.base import Engine


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class TorchEngine(dcp.DCPCheckpoints, Engine):
    """Subclasses set `model`, `module` (what forward calls), `optimizer`, `precision`, `scaler` (a loss scaler
    for fp16, else None) and `ctx`."""

    module: torch.nn.Module
    scaler: torch.amp.GradScaler | None = None

    def compute(self) -> contextlib.AbstractContextManager:
        """The context a forward runs in (DDP: autocast; FSDP casts in its hooks)."""
        return contextlib.nullcontext()

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        with self.compute():
            return self.module(*self.inputs(batch))

    def backward(self, loss: torch.Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, name: str) -> float:
        grad = self.model.get_parameter(name).grad
        if grad is None:
            return 0.0
        norm = full_tensor(grad.float().norm()).item()  # a DTensor's norm is reduced over the shards
        return norm / self.scaler.get_scale() if self.scaler is not None else norm

    @torch.no_grad()
    def call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        try:
            with self.compute():
                return getattr(self.model, method)(*self.inputs(inputs))
        finally:
            self.model.train(training)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank gathers every tensor (a collective in the same order everywhere)."""
        return {k: full_tensor(v) for k, v in self.model.state_dict().items()}
