"""The engine contract: everything the trainer, the planner and the checkpoint tools may ask of a backend.

An engine owns the wrapped model (MoCo, or a classifier when fine-tuning), the optimizer, mixed precision,
the momentum update, the parameter layout (replicated or sharded) and its checkpoint files. Nothing outside
engines/ names an engine: questions asked before an engine exists are methods of its typed config
(engines/config.py); the planner's byte counts are class methods; the rest are methods of a built engine.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from moco_scale.dist import DistContext
from moco_scale.engines.config import EngineConfig
from moco_scale.engines.memory import Shapes
from moco_scale.models.parts import TrainModule

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
#: compute dtypes of the precisions, one table for every engine
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: the reference's dynamic loss scaler (init 2^16, growth interval 2000), for fp16 in every engine
SCALER = {"init_scale": 2.0**16, "growth_interval": 2000}


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


def gpu_precision(cfg: EngineConfig, override: str | None = None) -> str:
    """The precision a GPU run of `cfg` trains in (the planner's question): the one rule on a bf16 GPU."""
    requested = override if override and override != "auto" else cfg.requested_precision
    return resolve_precision(requested, torch.device("cuda"), bf16_supported=True)


class Engine(ABC):
    """One training backend, built from (a model, an OptimizerSpec, its typed config, the process context)."""

    model: TrainModule
    optimizer: torch.optim.Optimizer
    precision: str
    ctx: DistContext
    #: the dtype images are cast to before the forward (a 16-bit module), None where autocast does it
    input_dtype: torch.dtype | None = None
    last_grad_norms: dict[str, float] = {}  # replaced by each train_step, never mutated
    name: ClassVar[str]

    # -- the planner's model of this engine (moco-scale plan), from parameter shapes -----------------------
    @classmethod
    @abstractmethod
    def state_bytes(cls, shapes: Shapes, cfg: EngineConfig, world: int, rank: int, precision: str,
                    optimizer: str) -> dict[str, int]:
        """Bytes of parameters, gradients, optimizer state and momentum encoder that stay allocated on `rank`."""

    @classmethod
    @abstractmethod
    def comm_bytes(cls, shapes: Shapes, cfg: EngineConfig, world: int, precision: str, chunks: int) -> int:
        """Bytes one rank sends per step for the model (ring collectives; the InfoNCE keys are the planner's)."""

    @classmethod
    def buffer_bytes(cls, shapes: Shapes, cfg: EngineConfig, precision: str, chunk: int) -> int:
        """Buffers beside the model state (buckets, a gathered backbone)."""
        return 0

    # -- the step --------------------------------------------------------------------------------------
    def inputs(self, batch: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The batch on this rank's device; the model's images in `input_dtype` (targets keep theirs)."""
        n = self.model.image_inputs
        return tuple(t.to(self.ctx.device, dtype=self.input_dtype if i < n else None, non_blocking=True)
                     for i, t in enumerate(batch))

    @abstractmethod
    def update_momentum(self, m: float) -> None:
        """theta_m = m theta_m + (1 - m) theta_b on the parameters this rank holds, in fp32 (no-op without an EMA)."""

    @abstractmethod
    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        """This rank's loss for its share of the global batch."""

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of the global-batch loss (averaged over ranks)."""

    @abstractmethod
    def step(self, lr: float) -> None:
        """One optimizer step at learning rate `lr` (times each group's lr_scale), then clear the gradients."""

    @abstractmethod
    def grad_norm(self, name: str) -> float:
        """L2 norm of the averaged, unscaled gradient of parameter `name` between backward and step (a
        collective under sharding: call it on every rank)."""

    def train_step(self, batch: Sequence[torch.Tensor], lr: float, m: float | None = None,
                   watch: tuple[str, ...] = ()) -> torch.Tensor:
        """One iteration in the reference's order: momentum update (MoCo), loss, backward, step. The gradient
        norms of the parameters named in `watch` are left in `last_grad_norms`."""
        if m is not None:
            self.update_momentum(m)
        loss = self.forward(*batch)
        self.backward(loss)
        self.last_grad_norms = {name: self.grad_norm(name) for name in watch}
        self.step(lr)
        return loss.detach()

    @abstractmethod
    def call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        """`model.<method>(*inputs)` without autograd, through the engine's wrapping, so a sharded model runs
        in place, gathering per block as its forward does (evaluation: kNN features, a classifier's logits).
        Between training steps too: the next step is the one the run takes without the call."""

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # -- state -----------------------------------------------------------------------------------------
    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model (reference names), fp32, on every rank: for tests and tools on small models, never in
        the training loop. A collective under sharding; tensors may share storage with the live model."""

    @abstractmethod
    def reference_state(self) -> dict[str, Any] | None:
        """What the reference's checkpoint.pth.tar holds: {"state_dict" (fp32, on the CPU, reference names),
        "optimizer" (a torch state_dict over `model.trainable_parameters()`, or None where the engine's state is
        partitioned), "scaler"} on rank 0, None on the others. A collective that gathers one tensor at a time:
        no rank ever holds the whole model on its device beside its own shards."""

    def load_reference_optimizer(self, optimizer: Any, scaler: Any) -> str | None:
        """Restore a reference-format optimizer (and loss scaler) state; None when done, else why it cannot."""
        return f"a {self.name} engine cannot take a single-file optimizer state"

    @abstractmethod
    def save(self, path: str) -> None:
        """Write the training state (model with fp32 momentum encoder, optimizer, loss scaler) into the
        existing folder `path`, in the engine's own layout. A collective: every rank writes its part."""

    @abstractmethod
    def load(self, path: str, saved_world_size: int) -> None:
        """Restore what `save` wrote, from a run at `saved_world_size` ranks; raises a ConfigError naming
        the way out where this engine cannot change the world size. A collective."""

    def close(self) -> None:  # noqa: B027 - optional hook: only engines holding resources override it
        """Release what the engine holds before the process group goes away."""
