"""Engines behind one contract, picked by the `engine` key of an engine JSON."""

from __future__ import annotations

from typing import Any

from moco_scale.config import ConfigError, load_json, looks_like_deepspeed, validate
from moco_scale.dist import DistContext
from moco_scale.engines.base import Engine
from moco_scale.engines.ddp import DDPEngine
from moco_scale.models import MoCo

ENGINES: dict[str, type[Engine]] = {"ddp": DDPEngine}


def load_engine_config(path: str | None) -> dict[str, Any]:
    """The engine JSON at `path` (DDP defaults when None), validated with every default filled in."""
    if path is None:
        return dict(DDPEngine.DEFAULTS)
    cfg = load_json(path)
    if looks_like_deepspeed(cfg):
        raise ConfigError(f"engine config {path} is a DeepSpeed config; this version runs the engines "
                          f"{', '.join(ENGINES)} only (ds_configs/ddp.json)")
    name = cfg.get("engine")
    if name not in ENGINES:
        raise ConfigError(f"engine config {path}: key 'engine' must be one of {', '.join(ENGINES)}, got {name!r}")
    cls = ENGINES[name]
    return validate(cfg, cls.DEFAULTS, cls.CHOICES, f"engine config {path}")


def build_engine(model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> Engine:
    return ENGINES[config["engine"]](model, optimizer, weight_decay, config, ctx)


__all__ = ["ENGINES", "Engine", "build_engine", "load_engine_config"]
