"""MoCo v3's ViT on timm's current VisionTransformer: fixed 2-D sin-cos position embedding, optional conv
stem and stop-grad-conv1. Built without initialising (models/init.py gives every tensor its value), so that
it can be built on the meta device."""

from __future__ import annotations

import math
from functools import partial
from typing import NamedTuple

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moco_scale.models.batchnorm import SyncBatchNorm


class ViTArch(NamedTuple):
    embed_dim: int
    depth: int
    num_heads: int
    patch_size: int
    conv_stem: bool


VIT_ARCHS: dict[str, ViTArch] = {
    "vit_tiny": ViTArch(192, 12, 3, 16, False),
    "vit_small": ViTArch(384, 12, 12, 16, False),  # 12 heads, not DeiT's 6
    "vit_base": ViTArch(768, 12, 12, 16, False),
    "vit_large": ViTArch(1024, 24, 16, 16, False),
    "vit_huge": ViTArch(1280, 32, 16, 14, False),
    "vit_conv_small": ViTArch(384, 11, 12, 16, True),
    "vit_conv_base": ViTArch(768, 11, 12, 16, True),
}


def sincos_pos_embed(grid_h: int, grid_w: int, dim: int) -> torch.Tensor:
    """(1, 1 + h*w, dim): zero for the cls token, then per patch k (row-major, r = k // w,
    c = k % w) the channels [sin(r w), cos(r w), sin(c w), cos(c w)], w_d = 1 / 10000^(d / (dim/4))."""
    if dim % 4:
        raise ValueError(f"embed dim {dim} must be divisible by 4 for the 2-D sin-cos position embedding")
    pos_dim = dim // 4
    omega = 1.0 / (10000.0 ** (torch.arange(pos_dim, dtype=torch.float32) / pos_dim))
    k = torch.arange(grid_h * grid_w)
    rows = torch.outer((k // grid_w).float(), omega)
    cols = torch.outer((k % grid_w).float(), omega)
    emb = torch.cat([rows.sin(), rows.cos(), cols.sin(), cols.cos()], dim=1)
    return torch.cat([torch.zeros(1, dim), emb], dim=0).unsqueeze(0)


class ConvStem(nn.Module):
    """[conv3x3 s2 -> BN -> ReLU] x log2(patch) with channels ..., D/4, D/2, D, then a 1x1 conv
    to D. For patch 16 this is the paper's four stages D/8, D/4, D/2, D."""

    def __init__(self, img_size: int = 224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768,
                 **_: object) -> None:
        super().__init__()
        stages = int(round(math.log2(patch_size)))
        if 2 ** stages != patch_size:
            raise ValueError(f"a conv stem needs a power-of-two patch size, not {patch_size}")
        if embed_dim % 2 ** (stages - 1):
            raise ValueError(f"conv stem: embed dim {embed_dim} must divide by {2 ** (stages - 1)}")
        self.img_size = (img_size, img_size)
        self.patch_size = (patch_size, patch_size)
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        c_in = in_chans
        for i in range(stages):
            c_out = embed_dim // 2 ** (stages - 1 - i)
            layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), SyncBatchNorm(c_out),
                       nn.ReLU(inplace=True)]
            c_in = c_out
        layers.append(nn.Conv2d(c_in, embed_dim, 1))
        self.proj = nn.Sequential(*layers)

    def feat_ratio(self, as_scalar: bool = True) -> int:
        return self.patch_size[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def build_vit(arch: str, img_size: int = 224, patch_size: int | None = None, embed_dim: int | None = None,
              depth: int | None = None, num_heads: int | None = None, stop_grad_conv1: bool = False,
              num_classes: int = 0, drop_path_rate: float = 0.0) -> VisionTransformer:
    """A ViT of `arch` with optional size overrides (tests and the demo use tiny ones); uninitialised.
    `num_classes` > 0 adds timm's Linear classifier head (fine-tuning), `drop_path_rate` stochastic depth."""
    d, n, h, p, conv = VIT_ARCHS[arch]
    d, n, h, p = embed_dim or d, depth or n, num_heads or h, patch_size or p
    if img_size % p:
        raise ValueError(f"image size {img_size} is not a multiple of the patch size {p}")
    if d % h:
        raise ValueError(f"embed dim {d} does not divide into {h} heads")
    if d % 4:
        raise ValueError(f"embed dim {d} must be divisible by 4 for the 2-D sin-cos position embedding")
    model = VisionTransformer(
        img_size=img_size, patch_size=p, embed_dim=d, depth=n, num_heads=h, mlp_ratio=4.0, qkv_bias=True,
        num_classes=num_classes, global_pool="token", class_token=True, weight_init="skip",
        drop_path_rate=drop_path_rate, norm_layer=partial(nn.LayerNorm, eps=1e-6),
        embed_layer=ConvStem if conv else PatchEmbed,
    )
    model.pos_embed.requires_grad_(False)  # fixed sin-cos (its value: models/init.py)
    if stop_grad_conv1 and not conv:
        model.patch_embed.proj.weight.requires_grad_(False)
        model.patch_embed.proj.bias.requires_grad_(False)
    return model
