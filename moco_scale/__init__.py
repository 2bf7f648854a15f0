"""moco-scale: exact MoCo v3 pretraining that scales past one node."""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["ARCHS", "MoCo", "build_moco", "__version__"]


def __getattr__(name: str) -> Any:
    """The models on first use: `python -m moco_scale` reaches its signal guard before torch is imported."""
    if name in ("ARCHS", "MoCo", "build_moco"):
        from moco_scale import models

        return getattr(models, name)
    raise AttributeError(f"module 'moco_scale' has no attribute {name!r}")
