"""Typed configuration: dataclasses read from JSON or flags, checked in one place; every error names the file
(or flag) and the key at fault."""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Literal, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
    """A wrong flag, config file or key: the message says which and what would be right."""


def load_json(path: str) -> dict[str, Any]:
    from moco_scale.paths import file_problem

    if why := file_problem(path):
        raise ConfigError(f"engine config {path} {why} (the JSON files are in ds_configs/)")
    try:
        with open(path) as f:
            cfg = json.load(f)
    except OSError as e:
        raise ConfigError(f"engine config {path} cannot be read: {e.strerror or e}") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"engine config {path} is not valid JSON: line {e.lineno} column {e.colno}: "
                          f"{e.msg}") from e
    if not isinstance(cfg, dict):
        raise ConfigError(f"engine config {path} must hold a JSON object, not {type(cfg).__name__}")
    return cfg


def _check(key: str, value: Any, kind: Any, source: str) -> Any:
    """`value` as the field type `kind` asks (an int is a float where a float is asked), or a ConfigError."""
    if typing.get_origin(kind) is Literal:
        choices = typing.get_args(kind)
        if value not in choices:
            raise ConfigError(f"{source}: key {key!r} must be one of {', '.join(map(str, choices))}, got {value!r}")
        return value
    expected = typing.get_origin(kind) or kind
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, expected) or (expected in (int, float) and isinstance(value, bool)):
        raise ConfigError(f"{source}: key {key!r} must be {expected.__name__}, got {value!r}")
    return value


def from_mapping(cls: type[T], data: dict[str, Any], source: str) -> T:
    """A dataclass from a JSON object: unknown keys refused (listing the known ones), each value checked
    against its field's type, defaults filled in."""
    hints = typing.get_type_hints(cls)
    known = [f.name for f in dataclasses.fields(cls) if f.init]
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return cls(**{k: _check(k, v, hints[k], source) for k, v in data.items()})


def to_dict(obj: Any) -> Any:
    """A (nested) dataclass as plain JSON values."""
    return dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else obj
