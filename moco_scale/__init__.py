"""moco-scale: exact MoCo v3 pretraining that scales past one node."""

from moco_scale.models import ARCHS, MoCo, build_moco

__version__ = "0.1.0"
__all__ = ["ARCHS", "MoCo", "build_moco", "__version__"]
