"""Checkpoints through torch.distributed.checkpoint, the one layout of the DDP and FSDP engines.

DCP names every tensor by its parameter name, whatever the sharding, so a folder written by DDP
resumes under FSDP and back, at any world size. The loss scaler travels as a Stateful entry; a
model whose optimizer has not stepped yet (just imported from a reference file) is saved
without optimizer state, since asking DCP for it would initialise it with a step of lr 0 (and
AdamW's step count would then be one ahead).
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful

from moco_scale.checkpoint.reference import from_reference_optimizer, to_reference_optimizer
from moco_scale.engines.config import DCP_LAYOUT

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)
# one plain process saves and loads through DCP without a process group, as intended: not worth a warning per save
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized",
                        category=UserWarning)


class ScalerState(Stateful):
    """A GradScaler (or FSDP's ShardedGradScaler, or none) as one JSON entry, the same key in every run, so that
    an fp32 run's folder loads into an fp16 run and back (the scale then starts fresh)."""

    def __init__(self, scaler: Any) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return {"json": json.dumps(self.scaler.state_dict() if self.scaler is not None else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = json.loads(state["json"])
        if saved and self.scaler is not None:
            self.scaler.load_state_dict(saved)


def _has_optimizer(path: str) -> bool:
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return any(k.startswith("optimizer.") for k in keys)


def reads(layout: str) -> bool:
    return layout == DCP_LAYOUT


def read_model_state(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Offline, one process: the whole model and the reference-layout optimizer state of a folder."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "full.pt")
        dcp_to_torch_save(str(folder), out)
        state = torch.load(out, map_location="cpu", weights_only=False)  # our own file, just written from DCP's
    optimizer = state.get("optimizer")
    return state["model"], None if optimizer is None else to_reference_optimizer(optimizer)


class DCPCheckpoints:
    """The checkpoint half of the engine contract for the engines whose state DCP names (DDP and FSDP):
    one layout, so a folder written by either resumes under the other. Mixed in before `Engine`."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: Any
    ctx: Any

    def save(self, path: str) -> None:
        """Each rank writes its shards (a replicated tensor once); a later load reshards to any world size."""
        state: dict[str, Any] = {"model": get_model_state_dict(self.model), "scaler": ScalerState(self.scaler)}
        if self.optimizer.state:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.save(state, checkpoint_id=path)

    def load(self, path: str, saved_world_size: int) -> None:
        """Resharded to this run's world size and engine as it loads; a collective."""
        state: dict[str, Any] = {"model": get_model_state_dict(self.model), "scaler": ScalerState(self.scaler)}
        with_optimizer = _has_optimizer(path)
        if with_optimizer:
            state["optimizer"] = get_optimizer_state_dict(self.model, self.optimizer)
        dcp.load(state, checkpoint_id=path)
        set_model_state_dict(self.model, state["model"])
        if with_optimizer:
            set_optimizer_state_dict(self.model, self.optimizer, state["optimizer"])

    def reference_state(self) -> dict[str, Any] | None:
        """The reference file's contents on rank 0 (CPU copies, gathered one tensor at a time), None elsewhere."""
        model_state = get_model_state_dict(self.model, options=_FULL)
        optim_state = get_optimizer_state_dict(self.model, self.optimizer, options=_FULL) if self.optimizer.state \
            else None
        if not self.ctx.is_main:
            return None
        return {"state_dict": {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()},
                "optimizer": None if optim_state is None else to_reference_optimizer(optim_state),
                "scaler": self.scaler.state_dict() if self.scaler is not None else None}

    def load_reference_optimizer(self, optimizer: Any, scaler: Any) -> str | None:
        named = from_reference_optimizer(optimizer, [n for n, _ in self.model.trainable_named_parameters()])
        if isinstance(named, str):
            return named
        set_optimizer_state_dict(self.model, self.optimizer, named, options=StateDictOptions(full_state_dict=True))
        if scaler and self.scaler is not None:
            self.scaler.load_state_dict(scaler)
        return None
