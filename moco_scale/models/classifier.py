"""The fine-tuning model: a pretrained backbone (timm's VisionTransformer with the checkpoint's own width, depth
and heads, or torchvision's ResNet) with a fresh classifier head, trained end to end under any engine.

Built on the meta device; its values come from the pretrained backbone, loaded strictly (every backbone tensor
used, nothing else), and the head's from MAE's init (trunc-normal std 2e-5, bias 0). Every tensor trains,
the position embedding too (DeiT fine-tunes it; MoCo v3 kept it fixed only while pretraining). Parameter groups
are timm's: weight decay off for 1-D tensors and the tokens, and with layer decay an `lr_scale` per group.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay, param_groups_weight_decay
from torch import nn

from moco_scale.models.init import Rule, classifier_head_rule, resnet_rule, vit_rule
from moco_scale.models.parts import Part, TrainModule, backbone_blocks, head_name
from moco_scale.models.resnet import RESNET_ARCHS, build_resnet
from moco_scale.models.vit import VIT_ARCHS, build_vit

#: the settings of a pretrained backbone that shape the model (moco-scale's record names them so)
SHAPE_KEYS = ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads", "stop_grad_conv1")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Classifier(TrainModule):
    """`forward(x, target)`: this rank's loss (`loss` of the fp32 logits and the targets, hard or soft);
    `forward(x)`: the logits. `net` is the whole timm/torchvision model, so its state dict has their key names."""

    def __init__(self, net: nn.Module, loss: Loss) -> None:
        super().__init__()
        self.net, self.loss = net, loss
        net.requires_grad_(True)

    @property
    def is_vit(self) -> bool:
        return isinstance(self.net, VisionTransformer)

    @property
    def head(self) -> nn.Linear:
        return getattr(self.net, head_name(self.net))

    def parts(self) -> list[Part]:
        return [Part(backbone_blocks(self.net), [self.head], True)]

    def init_rule(self, name: str) -> tuple[Rule, str]:
        key = name.removeprefix("net").removeprefix(".")
        if key == head_name(self.net):
            return classifier_head_rule, key
        return (vit_rule if self.is_vit else resnet_rule(self.net)), key

    def first_layer_names(self) -> tuple[str, ...]:
        names = dict(self.named_parameters())
        return tuple(n for n in ("net.patch_embed.proj.weight", "net.conv1.weight") if n in names)

    def forward(self, x: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        logits = self.net(x)
        return logits if target is None else self.loss(logits.float(), target)

    def head_keys(self) -> set[str]:
        return {f"{head_name(self.net)}.{k}" for k in self.head.state_dict()}

    def group_spec(self, weight_decay: float, layer_decay: float | None) -> list[dict[str, Any]]:
        """timm's parameter groups over `net`, by parameter name: no weight decay on 1-D tensors, biases and
        `no_weight_decay()` (tokens, position embedding); with `layer_decay`, MAE's per-layer `lr_scale` (stem 0,
        block i i + 1, the rest depth + 1; scale decay ** (depth + 1 - id)). Taken before an engine places the
        model: ZeRO-3 leaves its parameters 1-D partitions, which timm's ndim test would exempt from decay."""
        skip = self.net.no_weight_decay() if hasattr(self.net, "no_weight_decay") else set()
        if layer_decay is None:
            groups = param_groups_weight_decay(self.net, weight_decay, no_weight_decay_list=skip)
        elif not self.is_vit:
            raise ValueError("--layer-decay is defined for ViT blocks; a ResNet fine-tunes without it "
                             "(--layer-decay 1)")
        else:
            groups = param_groups_layer_decay(self.net, weight_decay, no_weight_decay_list=skip,
                                              layer_decay=layer_decay)
        names = {id(p): n for n, p in self.named_parameters()}
        return [{"names": [names[id(p)] for p in g["params"]], "weight_decay": g["weight_decay"],
                 **({"lr_scale": g["lr_scale"]} if "lr_scale" in g else {})} for g in groups]

    def param_groups(self, spec: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """`group_spec`'s groups over the parameters the model holds now (sharded or partitioned)."""
        params = dict(self.named_parameters())
        return [{**{k: v for k, v in g.items() if k != "names"}, "params": [params[n] for n in g["names"]]}
                for g in spec]


def build_classifier(settings: dict[str, Any], classes: int, drop_path: float, loss: Loss,
                     seed: int) -> Classifier:
    """A classifier of the pretrained backbone's shape (`settings`: moco-scale's model record) on the meta
    device: the checkpoint's heads, never timm's default for the size; `drop_path` stochastic depth (ViT)."""
    arch = settings["arch"]
    with torch.device("meta"):
        if arch in VIT_ARCHS:
            net: nn.Module = build_vit(arch, settings.get("img_size") or 224, settings.get("patch_size"),
                                       settings.get("embed_dim"), settings.get("depth"), settings.get("num_heads"),
                                       num_classes=classes, drop_path_rate=drop_path)
        elif arch in RESNET_ARCHS:
            if drop_path:
                raise ValueError(f"--drop-path {drop_path}: stochastic depth is for ViT blocks; pass --drop-path 0 "
                                 f"for {arch}")
            net = build_resnet(arch)
            net.fc = nn.Linear(net.fc.in_features, classes)
        else:
            raise ValueError(f"unknown architecture {arch!r}")
        model = Classifier(net, loss)
    model.init_seed = seed
    return model
