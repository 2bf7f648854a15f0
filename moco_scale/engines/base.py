"""The engine contract: everything the driver may ask of a training backend.

An engine owns the wrapped model, the optimizer, mixed precision, the momentum update
and the parameter layout (replicated or sharded). The driver holds no engine-specific
code: it calls `train_step` and asks for state through the methods below.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch

from moco_scale.models import MoCo

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_precision(precision: str, device: torch.device, bf16_supported: bool | None = None) -> str:
    """The one rule every engine follows: "auto" is bf16 on a CUDA GPU that has it (Ampere and later), the
    reference's fp16 with loss scaling on an older one (V100), fp32 on the CPU. fp16 is reachable by asking
    for it ("precision": "fp16", or DeepSpeed's fp16 section) and needs CUDA. `bf16_supported` overrides
    the device query (the planner assumes a bf16 GPU)."""
    if precision == "auto":
        if device.type != "cuda":
            return "fp32"
        if bf16_supported is None:
            bf16_supported = torch.cuda.is_bf16_supported()
        return "bf16" if bf16_supported else "fp16"
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("precision fp16 (with loss scaling) needs a CUDA device; use bf16 or fp32 on "
                         f"{device.type}")
    return precision


class Engine(ABC):
    """One training backend. Subclasses declare their JSON keys in DEFAULTS (and CHOICES)."""

    name: ClassVar[str]
    DEFAULTS: ClassVar[dict[str, Any]]
    CHOICES: ClassVar[dict[str, tuple]] = {}
    #: a sharding engine needs a process group even in one plain process
    needs_process_group: ClassVar[bool] = False

    model: MoCo
    optimizer: torch.optim.Optimizer
    precision: str
    last_grad_norms: dict[str, float] = {}  # replaced by each train_step, never mutated

    @abstractmethod
    def update_momentum(self, m: float) -> None:
        """theta_m = m theta_m + (1 - m) theta_b on the parameters this rank holds, in fp32."""

    @abstractmethod
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """This rank's loss for its share of the global batch (keys gathered from all ranks)."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the global-batch loss (averaged over ranks)."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer step at learning rate `lr`, then clear the gradients."""

    @abstractmethod
    def grad_norm(self, name: str) -> float:
        """L2 norm of the averaged, unscaled gradient of parameter `name` between backward and step (a
        collective under sharding: call it on every rank)."""

    def train_step(self, x1: torch.Tensor, x2: torch.Tensor, lr: float, m: float,
                   watch: tuple[str, ...] = ()) -> torch.Tensor:
        """One MoCo v3 iteration in the reference's order: momentum update, loss, backward, step.
        The gradient norms of the parameters named in `watch` are left in `last_grad_norms`."""
        self.update_momentum(m)
        loss = self.forward(x1, x2)
        self.backward(loss)
        self.last_grad_norms = {name: self.grad_norm(name) for name in watch}
        self.step(lr)
        return loss.detach()

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model in the reference layout (base_encoder.*, momentum_encoder.*, predictor.*), fp32.

        A collective under sharding (call it on every rank); tensors may share storage with the live
        model, so clone what must outlive the next step."""

    @abstractmethod
    def optimizer_state_dict(self) -> dict[str, Any]:
        """Optimizer and loss-scaler state, for checkpoints."""

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the training state (model with fp32 momentum encoder, optimizer, loss scaler) into the
        existing folder `path`, in the engine's own layout. A collective: every rank writes its part."""

    @abstractmethod
    def load(self, path: str, saved_world_size: int) -> None:
        """Restore what `save` wrote, from a run at `saved_world_size` ranks; raises a ConfigError naming
        the way out where this engine cannot change the world size. A collective."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def close(self) -> None:  # noqa: B027 - optional hook: only engines holding resources override it
        """Release what the engine holds before the process group goes away."""
