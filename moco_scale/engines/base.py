"""The engine contract: everything the driver, the planner and the checkpoint tools may ask of a backend.

An engine owns the wrapped model, the optimizer, mixed precision, the momentum update, the
parameter layout (replicated or sharded) and its checkpoint files. Nothing outside engines/
names an engine: questions asked before an engine exists (its checkpoint layout, its label,
the precision it asks for, whether it resumes a folder, how to read its files offline) are
class methods taking the engine config; the rest are methods of a built engine.
"""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, ClassVar

import torch

from moco_scale.config import ConfigError
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

    # -- policy: asked of an engine config, before (or without) building the engine ---------------
    @classmethod
    def layout(cls, cfg: dict[str, Any]) -> str:
        """The checkpoint layout written into meta.json: engines that read each other's folders share one."""
        return cls.name

    @classmethod
    def label(cls, cfg: dict[str, Any]) -> str:
        """How the run's first line names the engine."""
        return cls.name

    @classmethod
    def requested_precision(cls, cfg: dict[str, Any]) -> str:
        """What the config asks for ("auto", "fp32", "bf16", "fp16"), before the device decides."""
        return cfg["precision"]

    @classmethod
    def with_precision(cls, cfg: dict[str, Any], precision: str) -> dict[str, Any]:
        """A copy of `cfg` asking for `precision` (benchmarks and checks that pin it)."""
        return {**copy.deepcopy(cfg), "precision": precision}

    @classmethod
    def resume_config(cls, cfg: dict[str, Any], meta: dict[str, Any], source: Path) -> dict[str, Any]:
        """The config that resumes the checkpoint folder `source` (its meta.json `meta`): `cfg` itself, or a
        copy adjusted to read it; a ConfigError naming the way out where this engine cannot."""
        if meta["engine"] != cls.layout(cfg):
            raise ConfigError(f"--resume {source} was written by {meta['engine']} and this run uses "
                              f"{cls.layout(cfg)}: their layouts differ. Consolidate it (moco-scale convert --to "
                              f"reference {source} full.pth.tar) and --resume full.pth.tar, or resume with the same "
                              "--engine-config")
        return cfg

    @classmethod
    def reads(cls, layout: str) -> bool:
        """Whether `read_model_state` reads folders of this layout."""
        return layout == cls.name

    @classmethod
    def write_universal(cls, src: Path, out: Path, meta: dict[str, Any]) -> str:
        """Write a universal form of the checkpoint folder `src` into the new folder `out` (convert --to universal);
        returns where it resumes (the engines that can read it), for the user."""
        raise ValueError(f"{src} was written by {meta['engine']}: universal checkpoints are made from DeepSpeed "
                         "ZeRO 1-3 ones (torch.distributed.checkpoint folders of DDP and FSDP reshard as they are)")

    @classmethod
    @abstractmethod
    def read_model_state(cls, folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
        """Offline, in one process: the whole fp32 model (reference names) of a checkpoint folder this engine
        wrote, and its optimizer state in the reference's layout where it has one (else None)."""

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
        """The whole model in the reference layout (base_encoder.*, momentum_encoder.*, predictor.*), fp32, on
        every rank: for tests and tools on small models, never in the training loop.

        A collective under sharding (call it on every rank); tensors may share storage with the live
        model, so clone what must outlive the next step."""

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

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def close(self) -> None:  # noqa: B027 - optional hook: only engines holding resources override it
        """Release what the engine holds before the process group goes away."""
