"""Linear evaluation as MoCo v3 runs it: the pretrained base backbone frozen in eval mode (its BN statistics
too), fp32, a Linear classifier (N(0, 0.01), bias 0), optionally after a parameter-free BatchNorm; and top-1 /
top-5 over a validation set counted exactly once per image, whatever the world size."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from moco_scale.dist import DistContext
from moco_scale.models import SyncBatchNorm
from moco_scale.models.init import Rule, mlp_rule, resnet_rule, vit_rule
from moco_scale.models.parts import Part, TrainModule, backbone_features
from moco_scale.models.vit import VisionTransformer


def linear_head_rule(name: str, module: nn.Module, t: dict[str, torch.Tensor], gen) -> None:
    """The reference's linear classifier: weight N(0, 0.01), bias 0 (a BN before it: ones and zeros)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(t["weight"], std=0.01, generator=gen("weight"))
        nn.init.zeros_(t["bias"])
    else:
        mlp_rule(name, module, t, gen)


class LinearClassifier(TrainModule):
    """`forward(x, target)`: the cross-entropy of the classifier on frozen features; `forward(x)`: logits."""

    def __init__(self, backbone: nn.Module, dim: int, classes: int, bn: bool) -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False)
        self.classifier = nn.Sequential(*([SyncBatchNorm(dim, affine=False)] if bn else []), nn.Linear(dim, classes))

    def parts(self) -> list[Part]:
        return [Part([], [self.classifier], True)]

    def init_rule(self, name: str) -> tuple[Rule, str]:
        if name.startswith("classifier"):
            return linear_head_rule, name
        key = name.removeprefix("backbone").removeprefix(".")
        return (vit_rule if isinstance(self.backbone, VisionTransformer) else resnet_rule(self.backbone)), key

    def train(self, mode: bool = True) -> LinearClassifier:
        super().train(mode)
        self.backbone.eval()  # frozen, BN statistics included, in training as in evaluation
        return self

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        with torch.no_grad():
            features = backbone_features(self.backbone, x)
        logits = self.classifier(features)
        return logits if target is None else F.cross_entropy(logits, target)


def per_epoch_cosine(epoch: float, lr: float, epochs: int) -> float:
    """The reference's linear-evaluation schedule: cosine over epochs, stepped per epoch, no warmup."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * math.floor(epoch) / epochs))


@torch.no_grad()
def accuracy(logits_of, loader: DataLoader, ctx: DistContext) -> dict[str, Any]:
    """Top-1 / top-5 (percent) and the image count: each rank scores its share (a `Shard` sampler: every image
    once), the correct counts are summed over ranks. `logits_of(x)` is the model's forward."""
    counts = torch.zeros(3, dtype=torch.float64, device=ctx.device)
    for x, y in loader:
        logits = logits_of(x)
        y = y.to(logits.device)
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=logits.device)]
                              ).to(counts)
    if ctx.is_distributed and ctx.world_size > 1:
        torch.distributed.all_reduce(counts)
    n = counts[2].item()
    return {"top1": 100 * counts[0].item() / n, "top5": 100 * counts[1].item() / n, "correct": int(counts[0].item()),
            "images": int(n)}
