"""Engines behind one contract, picked by the engine JSON: `"engine": "ddp" | "fsdp"` in moco-scale's
small schema, or a genuine DeepSpeed config (recognised by its DeepSpeed keys)."""

from __future__ import annotations

from typing import Any

import torch

from moco_scale.config import ConfigError, load_json, looks_like_deepspeed, validate
from moco_scale.dist import DistContext
from moco_scale.engines.base import Engine, resolve_precision
from moco_scale.engines.ddp import DDPEngine
from moco_scale.engines.deepspeed import DeepSpeedEngine
from moco_scale.engines.deepspeed_config import resolve_deepspeed_config
from moco_scale.engines.fsdp import FSDPEngine
from moco_scale.models import MoCo

ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine, "fsdp": FSDPEngine, "deepspeed": DeepSpeedEngine}


def load_engine_config(path: str | None, global_batch: int | None = None, world: int = 1) -> dict[str, Any]:
    """The engine JSON at `path` (DDP defaults when None), validated with every default filled in.

    A DeepSpeed JSON's "auto" batch fields are filled from `global_batch` and `world`.
    """
    if path is None:
        return dict(DDPEngine.DEFAULTS)
    cfg = load_json(path)
    if looks_like_deepspeed(cfg):
        return resolve_deepspeed_config(cfg, path, global_batch, world)
    name = cfg.get("engine")
    if name == "fairscale":
        raise ConfigError(f"engine config {path}: fairscale is not supported: its FSDP moved into PyTorch as "
                          "torch.distributed.fsdp, which moco-scale uses; its last release (0.4.13, 2022) fails on "
                          "torch 2.x. Use ds_configs/fsdp.json (full shard) or ds_configs/fsdp_grad_op.json")
    if name not in ("ddp", "fsdp"):
        raise ConfigError(f"engine config {path}: key 'engine' must be ddp or fsdp (or the file a DeepSpeed "
                          f"config with a 'zero_optimization' section), got {name!r}")
    cls = ENGINES[name]
    return validate(cfg, cls.DEFAULTS, cls.CHOICES, f"engine config {path}")


def engine_class(config: dict[str, Any]) -> type[Engine]:
    """The engine a resolved config (load_engine_config) builds: ask it the policy questions."""
    return ENGINES[config["engine"]]


def engine_for_layout(layout: str, source: object) -> type[Engine]:
    """The engine that reads checkpoint folders of `layout` (a meta.json's "engine")."""
    for cls in ENGINES.values():
        if cls.reads(layout):
            return cls
    raise ValueError(f"checkpoint {source} has layout {layout!r}, which no engine of this moco-scale reads")


def build_engine(model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> Engine:
    return engine_class(config)(model, optimizer, weight_decay, config, ctx)


def precision_asked(config: dict[str, Any]) -> str:
    """The precision an engine config asks for ("auto", "fp32", "bf16", "fp16"), before the device decides."""
    return engine_class(config).requested_precision(config)


def gpu_precision(config: dict[str, Any], override: str | None = None) -> str:
    """The precision a GPU run of `config` trains in (the planner's question): the engines' one rule on a bf16 GPU."""
    requested = override if override and override != "auto" else precision_asked(config)
    return resolve_precision(requested, torch.device("cuda"), bf16_supported=True)


def with_precision(config: dict[str, Any], precision: str) -> dict[str, Any]:
    """A copy of `config` asking for `precision`, whichever engine it configures."""
    return engine_class(config).with_precision(config, precision)


def needs_process_group(config: dict[str, Any]) -> bool:
    return engine_class(config).needs_process_group


__all__ = ["ENGINES", "Engine", "build_engine", "engine_class", "engine_for_layout", "gpu_precision",
           "load_engine_config", "needs_process_group", "precision_asked", "with_precision"]
