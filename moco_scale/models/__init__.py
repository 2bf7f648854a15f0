"""Model zoo: `build_moco(arch, ...)` assembles backbone, heads and momentum encoder."""

from __future__ import annotations

import torch

from moco_scale.models.batchnorm import SyncBatchNorm, convert_sync_batchnorm
from moco_scale.models.heads import build_mlp
from moco_scale.models.init import draw_seed, init_weights
from moco_scale.models.moco import MoCo
from moco_scale.models.parts import TrainModule, backbone_blocks, backbone_features, projector
from moco_scale.models.resnet import RESNET_ARCHS, build_resnet
from moco_scale.models.vit import VIT_ARCHS, build_vit

ARCHS = sorted([*VIT_ARCHS, *RESNET_ARCHS])


class UnknownArchError(ValueError):
    pass


def build_moco(arch: str = "vit_small", *, img_size: int = 224, patch_size: int | None = None,
               embed_dim: int | None = None, depth: int | None = None, num_heads: int | None = None,
               stop_grad_conv1: bool = False, moco_dim: int = 256, moco_mlp_dim: int = 4096,
               moco_t: float = 1.0, seed: int | None = None, device: str = "cpu") -> MoCo:
    """MoCo v3 for `arch` with the spec's heads; every BN synced across ranks (a no-op alone).

    Size overrides (img_size, patch_size, embed_dim, depth, num_heads) apply to ViTs only. `seed` fixes every
    initial value (default: drawn from torch's generator, so `torch.manual_seed` before building fixes the
    model). `device="meta"` builds without memory: an engine materialises it shard by shard (models/init.py).
    """
    model_seed = draw_seed() if seed is None else seed
    with torch.device("meta"):
        if arch in VIT_ARCHS:
            encoder = build_vit(arch, img_size, patch_size, embed_dim, depth, num_heads, stop_grad_conv1)
            encoder.head = build_mlp(3, encoder.embed_dim, moco_mlp_dim, moco_dim)
            predictor = build_mlp(2, moco_dim, moco_mlp_dim, moco_dim)
        elif arch in RESNET_ARCHS:
            overrides = {"patch_size": patch_size, "embed_dim": embed_dim, "depth": depth, "num_heads": num_heads}
            given = [k for k, v in overrides.items() if v is not None]
            if given:
                raise ValueError(f"{', '.join(given)} only apply to ViT architectures, not {arch}")
            encoder = build_resnet(arch)
            encoder.fc = build_mlp(2, encoder.fc.weight.shape[1], moco_mlp_dim, moco_dim)
            predictor = build_mlp(2, moco_dim, moco_mlp_dim, moco_dim, last_bn=False)
        else:
            raise UnknownArchError(f"unknown architecture {arch!r}; known: {', '.join(ARCHS)}")
        model = MoCo(encoder, predictor, moco_t)
    model.init_seed = model_seed
    if device != "meta":
        model.to_empty(device="cpu")
        init_weights(model)
        model.to(device)
    return model


__all__ = ["ARCHS", "MoCo", "SyncBatchNorm", "TrainModule", "UnknownArchError", "backbone_blocks",
           "backbone_features", "build_mlp", "build_moco", "convert_sync_batchnorm", "projector"]
