"""Engine JSON loading and validation; every error names the file and the key at fault."""

from __future__ import annotations

import json
from typing import Any


class ConfigError(ValueError):
    """A wrong flag, config file or key: the message says which and what would be right."""


def load_json(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            cfg = json.load(f)
    except FileNotFoundError as e:
        raise ConfigError(f"engine config {path} does not exist") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine config {path} is not valid JSON: line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"engine config {path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def validate(cfg: dict[str, Any], defaults: dict[str, Any], choices: dict[str, tuple], source: str) -> dict:
    """Defaults filled in; unknown keys, wrong types and values outside `choices` refused."""
    unknown = sorted(set(cfg) - set(defaults))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(defaults))}")
    out = {**defaults, **cfg}
    for key, value in cfg.items():
        expected = type(defaults[key])
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = out[key] = float(value)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise ConfigError(f"{source}: key {key!r} must be {expected.__name__}, got {value!r}")
        if key in choices and value not in choices[key]:
            raise ConfigError(f"{source}: key {key!r} must be one of {', '.join(map(str, choices[key]))}, "
                              f"got {value!r}")
    return out


def looks_like_deepspeed(cfg: dict[str, Any]) -> bool:
    return "engine" not in cfg and any(k in cfg for k in ("zero_optimization", "train_batch_size",
                                                           "train_micro_batch_size_per_gpu", "bf16", "fp16"))
