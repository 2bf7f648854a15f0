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

from moco_scale.dist import DistContext
from moco_scale.files import load_checkpoint
from moco_scale.models import MoCo

LAYOUT = "torch.distributed.checkpoint"
#: layouts of older moco-scale folders that hold the same files ("fsdp": DCP before DDP joined it)
OLD_LAYOUTS = ("fsdp", "ddp")
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
        enabled = self.scaler is not None and self.scaler.is_enabled()
        return {"json": json.dumps(self.scaler.state_dict() if enabled else {})}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = json.loads(state["json"])
        if saved and self.scaler is not None and self.scaler.is_enabled():
            self.scaler.load_state_dict(saved)


def _has_optimizer(path: str) -> bool:
    keys = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    return any(k.startswith("optimizer.") for k in keys)


def save(model: MoCo, optimizer: torch.optim.Optimizer, scaler: Any, path: str) -> None:
    """Each rank writes its shards (a replicated tensor once); a collective."""
    state: dict[str, Any] = {"model": get_model_state_dict(model), "scaler": ScalerState(scaler)}
    if optimizer.state:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.save(state, checkpoint_id=path)


def load(model: MoCo, optimizer: torch.optim.Optimizer, scaler: Any, path: str) -> None:
    """Resharded to this run's world size and engine as it loads; a collective."""
    state: dict[str, Any] = {"model": get_model_state_dict(model), "scaler": ScalerState(scaler)}
    with_optimizer = _has_optimizer(path)
    if with_optimizer:
        state["optimizer"] = get_optimizer_state_dict(model, optimizer)
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    if with_optimizer:
        set_optimizer_state_dict(model, optimizer, state["optimizer"])


def to_reference_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (DCP's) in torch's own layout, keyed by position, as the reference saves."""
    names = [n for group in state["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def from_reference_optimizer(state: Any, model: MoCo) -> dict[str, Any] | str:
    """The reference's position-keyed optimizer state named by parameter, or why it does not fit this model."""
    names = [n for n, _ in model.trainable_named_parameters()]
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        return "it holds none" if not state else "its 'optimizer' is not a torch optimizer state"
    given = [i for g in state["param_groups"] for i in g["params"]]
    if len(given) != len(names):
        return f"it covers {len(given)} parameters, this model trains {len(names)}"
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def reference_state(model: MoCo, optimizer: torch.optim.Optimizer, scaler: Any, is_main: bool) -> dict | None:
    """The reference file's contents on rank 0 (CPU copies, gathered one tensor at a time), None elsewhere."""
    model_state = get_model_state_dict(model, options=_FULL)
    optim_state = get_optimizer_state_dict(model, optimizer, options=_FULL) if optimizer.state else None
    if not is_main:
        return None
    return {"state_dict": {k: v.float() if v.is_floating_point() else v for k, v in model_state.items()},
            "optimizer": None if optim_state is None else to_reference_optimizer(optim_state),
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None}


def load_reference_optimizer(model: MoCo, optimizer: torch.optim.Optimizer, scaler: Any, state: Any,
                             scaler_state: Any) -> str | None:
    named = from_reference_optimizer(state, model)
    if isinstance(named, str):
        return named
    set_optimizer_state_dict(model, optimizer, named, options=StateDictOptions(full_state_dict=True))
    if scaler_state and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(scaler_state)
    return None


def read_model_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Offline, one process: the whole model and the reference-layout optimizer state of a folder."""
    if (folder / "engine.pt").is_file():  # the single-file DDP layout of moco-scale before 0.2
        state = load_checkpoint(str(folder / "engine.pt"))
        return state["model"], state["optimizer"]
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

    model: MoCo
    optimizer: torch.optim.Optimizer
    scaler: Any
    ctx: DistContext

    @classmethod
    def layout(cls, cfg: dict[str, Any]) -> str:
        return LAYOUT

    @classmethod
    def reads(cls, layout: str) -> bool:
        return layout == LAYOUT or layout in OLD_LAYOUTS

    @classmethod
    def read_model_state(cls, folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
        return read_model_state(folder)

    def save(self, path: str) -> None:
        """Each rank writes its shards (a replicated tensor once); a later load reshards to any world size."""
        save(self.model, self.optimizer, self.scaler, path)

    def load(self, path: str, saved_world_size: int) -> None:
        load(self.model, self.optimizer, self.scaler, path)

    def reference_state(self) -> dict[str, Any] | None:
        return reference_state(self.model, self.optimizer, self.scaler, self.ctx.is_main)

    def load_reference_optimizer(self, optimizer: Any, scaler: Any) -> str | None:
        return load_reference_optimizer(self.model, self.optimizer, self.scaler, optimizer, scaler)
