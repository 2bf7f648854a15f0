"""Engines behind one contract, picked by the engine JSON: `"engine": "ddp" | "fsdp"` in moco-scale's
small schema, or a genuine DeepSpeed config (recognised by its DeepSpeed keys)."""

from __future__ import annotations

from typing import Any

from moco_scale.config import ConfigError, load_json, looks_like_deepspeed, validate
from moco_scale.dist import DistContext
from moco_scale.engines.base import Engine
from moco_scale.engines.ddp import DDPEngine
from moco_scale.engines.deepspeed import DeepSpeedEngine, requested_precision, resolve_deepspeed_config
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


def build_engine(model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> Engine:
    return ENGINES[config["engine"]](model, optimizer, weight_decay, config, ctx)


def precision_asked(config: dict[str, Any]) -> str:
    """The precision an engine config asks for ("auto", "fp32", "bf16", "fp16"), before the device decides."""
    return requested_precision(config["deepspeed"]) if config["engine"] == "deepspeed" else config["precision"]


def needs_process_group(config: dict[str, Any]) -> bool:
    return ENGINES[config["engine"]].needs_process_group


__all__ = ["ENGINES", "Engine", "build_engine", "load_engine_config", "needs_process_group", "precision_asked"]
