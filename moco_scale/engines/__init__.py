"""Engines behind one contract (engines/base.py), picked by the typed engine config (engines/config.py):
`load_engine_config(path, batch, world).build(model, optimizer, ctx)`. Checkpoint folders are read offline by
the reader of their layout (dcp.py, deepspeed_checkpoint.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from moco_scale.engines import dcp, deepspeed_checkpoint
from moco_scale.engines.base import Engine, gpu_precision, resolve_precision
from moco_scale.engines.config import DDPConfig, DeepSpeedConfig, EngineConfig, FSDPConfig, load_engine_config

#: the offline readers, one per checkpoint layout family
READERS = (dcp, deepspeed_checkpoint)


def _reader(meta: dict[str, Any], source: object):
    for reader in READERS:
        if reader.reads(meta["engine"]):
            return reader
    raise ValueError(f"checkpoint {source} has layout {meta['engine']!r}, which no engine of this moco-scale reads")


def read_model_state(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Offline, in one process: the whole fp32 model (reference names) of a checkpoint folder, and its optimizer
    state in the reference's layout where its engine keeps one whole (else None)."""
    return _reader(meta, folder).read_model_state(folder, meta)


def write_universal(src: Path, out: Path, meta: dict[str, Any]) -> str:
    """A universal form of the folder `src` in the new folder `out` (convert --to universal); returns where it
    resumes (the engines that read it)."""
    if not deepspeed_checkpoint.reads(meta["engine"]):
        raise ValueError(f"{src} was written by {meta['engine']}: universal checkpoints are made from DeepSpeed "
                         "ZeRO 1-3 ones (torch.distributed.checkpoint folders of DDP and FSDP reshard as they are)")
    return deepspeed_checkpoint.write_universal(src, out, meta)


__all__ = ["DDPConfig", "DeepSpeedConfig", "Engine", "EngineConfig", "FSDPConfig", "gpu_precision",
           "load_engine_config", "read_model_state", "resolve_precision", "write_universal"]
