"""A DeepSpeed JSON read as moco-scale reads it: "auto" batch fields filled from -b and the world size,
moco-scale's own "moco_scale" section split off, keys DeepSpeed would silently ignore refused, and the
bf16/fp16 sections resolved by the engines' one precision rule."""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from typing import Any

import torch

from moco_scale.config import ConfigError, from_mapping
from moco_scale.engines.base import resolve_precision
from moco_scale.engines.config import DeepSpeedConfig
from moco_scale.paths import folder_problem, writable_folder_problem


@dataclass(frozen=True)
class MocoScaleSection:
    """moco-scale's own keys, in a "moco_scale" section that is removed before DeepSpeed reads the file."""

    activation_checkpointing: int = 0
    backbone_chunk: int = 0
    compile: bool = False


BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_deepspeed_config(raw: dict[str, Any], source: str, global_batch: int | None,
                             world: int) -> DeepSpeedConfig:
    """The engine config for a DeepSpeed JSON: its "auto" batch fields filled from -b and the world
    size (numbers must agree with them), clipping off unless asked for, moco-scale's section split off."""
    cfg = copy.deepcopy(raw)
    ours = from_mapping(MocoScaleSection, cfg.pop("moco_scale", {}), f"engine config {source}: section 'moco_scale'")
    if ours.compile or "compile" in cfg:
        raise ConfigError(f"engine config {source}: compile is not offered under DeepSpeed: its compile path "
                          "(engine.compile()) compiles the whole engine-wrapped module, where ZeRO's parameter "
                          "hooks and moco-scale's momentum update in the partitions would run inside graphs that "
                          "have not been checked against the reference; compile per block with "
                          "ds_configs/ddp.json or ds_configs/fsdp.json and \"compile\": true, or remove the key")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"engine config {source}: remove the '{key}' section: the optimizer and its schedule "
                              "come from --optimizer, --lr, --wd, --epochs and --warmup-epochs, as in the reference")
    check_types(cfg, source)
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine config {source}: key 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 3:
        # the momentum encoder is updated in its partitions; a parameter DeepSpeed keeps whole ("persisted",
        # its default below 1e5 elements) would never see the update in its forward
        persist = zero.setdefault("stage3_param_persistence_threshold", 0)
        if persist != 0:
            raise ConfigError(f"engine config {source}: key 'zero_optimization.stage3_param_persistence_threshold' "
                              f"must be 0 (got {persist}): moco-scale updates the momentum encoder in its ZeRO-3 "
                              "partitions, and a persisted parameter would not see the update")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(f"engine config {source}: key 'gradient_accumulation_steps' must be 1 or \"auto\", got "
                          f"{gas!r}: MoCo v3 takes its negatives from the whole global batch in one step, so "
                          "accumulation would change the loss")
    cfg["gradient_accumulation_steps"] = 1
    if global_batch is not None:
        want = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": global_batch // world}
        for key, value in want.items():
            given = cfg.get(key, "auto")
            if given != "auto" and given != value:
                raise ConfigError(f"engine config {source}: key '{key}' is {given}, but -b {global_batch} over "
                                  f"{world} rank(s) gives {value}; set it to \"auto\" or {value}")
            cfg[key] = value
    # DeepSpeed clips at 1.0 unless told otherwise; the reference clips nothing
    cfg.setdefault("gradient_clipping", 0.0)
    unknown = unknown_top_level_keys(cfg)
    if unknown:
        import difflib

        known = sorted(_known_keys())
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1))
                             else "") for k in unknown]
        raise ConfigError(f"engine config {source}: unknown top-level key(s) {', '.join(hints)}: DeepSpeed "
                          "ignores keys it does not know, so a misspelled section would silently do nothing")
    return DeepSpeedConfig(zero_stage=stage, activation_checkpointing=ours.activation_checkpointing,
                           backbone_chunk=ours.backbone_chunk, deepspeed=cfg)


#: top-level sections that DeepSpeed reads as objects
_SECTIONS = ("bf16", "fp16", "zero_optimization", "timers", "activation_checkpointing", "flops_profiler",
             "comms_logger", "tensorboard", "wandb", "csv_monitor", "aio")


def _shown(value: Any) -> str:
    return json.dumps(value)


def check_types(cfg: dict[str, Any], source: str) -> None:
    """Types, not only keys: DeepSpeed tracebacks on a boolean where a section belongs and reads a string
    "true" as off; offload needs moco-scale's optimizer allowed (`zero_force_ds_cpu_optimizer: false`) and
    nvme offload a folder."""
    where = f"engine config {source}"
    for key in _SECTIONS:
        if key in cfg and not isinstance(cfg[key], dict):
            example = ' {"enabled": true}' if key in ("bf16", "fp16") else ""
            raise ConfigError(f"{where}: key '{key}' must be an object{example}, not {_shown(cfg[key])}")
    for key in ("bf16", "fp16"):
        enabled = cfg.get(key, {}).get("enabled", False)
        if enabled not in (True, False, "auto"):
            raise ConfigError(f"{where}: key '{key}.enabled' must be true, false or \"auto\", not {_shown(enabled)}"
                              f"{' (a string: DeepSpeed would train in fp32)' if isinstance(enabled, str) else ''}")
    for key in ("tensorboard", "csv_monitor"):  # DeepSpeed's monitors write under output_path/job_name
        path = cfg.get(key, {}).get("output_path")
        if path is not None and not isinstance(path, str):
            raise ConfigError(f"{where}: key '{key}.output_path' must be a folder's path, not {_shown(path)}")
        if path and (why := writable_folder_problem(path)):
            raise ConfigError(f"{where}: key '{key}.output_path' {path} {why}")
    zero = cfg.get("zero_optimization", {})
    for part in ("offload_optimizer", "offload_param"):
        offload = zero.get(part)
        if offload is None:
            continue
        if not isinstance(offload, dict):
            raise ConfigError(f"{where}: key 'zero_optimization.{part}' must be an object "
                              f'{{"device": "cpu"}}, not {_shown(offload)}')
        device = offload.get("device", "none")
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{where}: key 'zero_optimization.{part}.device' must be \"cpu\", \"nvme\" or "
                              f"\"none\", not {_shown(device)}")
        if device == "none":
            continue
        if part == "offload_param" and zero.get("stage", 0) != 3:
            raise ConfigError(f"{where}: key 'zero_optimization.offload_param' needs stage 3 (parameters are "
                              f"partitioned only there), not stage {zero.get('stage', 0)}")
        if device == "nvme":
            path = offload.get("nvme_path")
            if not isinstance(path, str) or not path:
                raise ConfigError(f"{where}: key 'zero_optimization.{part}.nvme_path' must name the folder on "
                                  "the NVMe drive to offload to")
            if why := folder_problem(path):
                raise ConfigError(f"{where}: key 'zero_optimization.{part}.nvme_path' {path} {why}")
        if cfg.get("zero_force_ds_cpu_optimizer", True) is not False:
            raise ConfigError(f"{where}: key 'zero_optimization.{part}' offloads to {device}: add "
                              "\"zero_force_ds_cpu_optimizer\": false at the top level; moco-scale brings its own "
                              "optimizer, and without the key DeepSpeed refuses it under offload and asks for an "
                              "'optimizer' section, which moco-scale does not take (see ds_configs/zero3_offload.json)")


class _ReadKeys(dict):
    """A config dict that records which top-level keys DeepSpeed's parser asks for."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


_READ: set[str] = set()
_KNOWN: set[str] = set()


def _read_keys() -> set[str]:
    """The top-level keys DeepSpeed's config parser asks for, and the sections read outside it: enough for
    every config in ds_configs/, at the cost of one parse."""
    if not _READ:
        from deepspeed.runtime.config import DeepSpeedConfig

        probe = _ReadKeys({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                           "gradient_accumulation_steps": 1})
        DeepSpeedConfig(probe)
        _READ.update(probe.read, _SECTIONS)
    return _READ


def _known_keys() -> set[str]:
    """Every top-level key name this DeepSpeed defines: the parser's, and the key names its config and constants
    modules hold (sections it reads only when present, through `keys()`). Imports those modules, so it runs
    only for a key the parser does not ask for (a typo, or a rare feature), and for the typo's hint."""
    if not _KNOWN:
        import importlib
        import pkgutil

        import deepspeed

        _KNOWN.update(_read_keys())
        for info in pkgutil.walk_packages(deepspeed.__path__, "deepspeed."):
            if not info.name.endswith(("constants", ".config")) or ".ops" in info.name or "inference" in info.name:
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional feature's module that needs what is not installed
                continue
            _KNOWN.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str))
    return _KNOWN


def unknown_top_level_keys(cfg: dict[str, Any]) -> list[str]:
    """The keys of a DeepSpeed config that the installed DeepSpeed would never read (moco-scale checks them: it
    does not)."""
    maybe = [k for k in cfg if k not in _read_keys()]
    return sorted(k for k in maybe if k not in _known_keys()) if maybe else []


#: the reference's dynamic loss scaler (init 2^16, growth interval 2000), for an fp16 section "auto" turns on
_FP16_DEFAULTS = {"initial_scale_power": 16, "loss_scale_window": 2000}


def requested_precision(cfg: dict[str, Any]) -> str:
    """What a DeepSpeed config's bf16/fp16 sections ask for: "enabled": "auto" in either is "auto"."""
    bf16, fp16 = (cfg.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    if bf16 is True and fp16 is True:
        raise ConfigError("engine config: 'bf16' and 'fp16' cannot both be enabled")
    return "bf16" if bf16 is True else "fp16" if fp16 is True else "auto" if "auto" in (bf16, fp16) else "fp32"


def resolve_config_precision(cfg: dict[str, Any], device: torch.device) -> str:
    """The engines' one rule (engines/base.py) for a DeepSpeed config; its sections are rewritten to say what
    was chosen."""
    requested = requested_precision(cfg)
    try:
        precision = resolve_precision(requested, device)
    except ValueError as e:
        raise ConfigError(f"engine config: {e}") from None
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    if precision == "fp16":
        cfg["fp16"] = {**_FP16_DEFAULTS, **cfg.get("fp16", {}), "enabled": True}
    elif "fp16" in cfg:
        cfg["fp16"] = {**cfg["fp16"], "enabled": False}
    return precision
