"""Checkpoints in the reference trainer's single-file layout, written atomically."""

from __future__ import annotations

import os
from typing import Any

import torch

from moco_scale.engines import Engine


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def reference_checkpoint(engine: Engine, next_epoch: int, arch: str, model_kwargs: dict[str, Any],
                         step: int) -> dict[str, Any]:
    """{'epoch', 'arch', 'state_dict' (module.* keys), 'optimizer', 'scaler'} as the reference writes,
    plus 'moco_scale' (model kwargs and step) so moco-scale can rebuild a tiny or overridden model.
    Must be called on every rank: a sharded engine gathers the full state."""
    opt = engine.optimizer_state_dict()
    return {
        "epoch": next_epoch,
        "arch": arch,
        "state_dict": {f"module.{k}": v.detach().cpu() for k, v in engine.full_state_dict().items()},
        "optimizer": opt["optimizer"],
        "scaler": opt["scaler"],
        "moco_scale": {"model": model_kwargs, "step": step},
    }


def load_checkpoint(path: str) -> dict[str, Any]:
    """Load a checkpoint file safely (weights_only), with an error that names the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except Exception as e:
        raise ValueError(f"cannot read checkpoint {path}: {e}") from e
