"""What an engine asks of any model it trains (MoCo for pretraining, a classifier for fine-tuning): the parts
it shards and in which order a step runs them, the parameters it trains, the momentum pairs it moves, and
how the model's tensors start. Engines never look inside a model otherwise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from moco_scale.models.init import Rule
from moco_scale.models.resnet import resnet_features


def backbone_features(encoder: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The feature the projector (or a classifier) consumes: ViT cls token after the final LayerNorm, ResNet pool."""
    if isinstance(encoder, VisionTransformer):
        return encoder.forward_head(encoder.forward_features(x), pre_logits=True)
    return resnet_features(encoder, x)


def backbone_blocks(encoder: nn.Module) -> list[nn.Module]:
    """The repeated blocks a sharding engine wraps one by one (and activation checkpointing recomputes):
    ViT transformer blocks, ResNet residual blocks."""
    if isinstance(encoder, VisionTransformer):
        return list(encoder.blocks)
    return [block for layer in (encoder.layer1, encoder.layer2, encoder.layer3, encoder.layer4) for block in layer]


def projector(encoder: nn.Module) -> nn.Module:
    """The encoder's head: the MoCo projector (or a classifier) in place of timm's `head` / torchvision's `fc`."""
    return encoder.head if isinstance(encoder, VisionTransformer) else encoder.fc


def head_name(encoder: nn.Module) -> str:
    return "head" if isinstance(encoder, VisionTransformer) else "fc"


@dataclass
class Part:
    """One encoder as an engine sees it: `blocks` are sharded one unit each (and recomputed with activation
    checkpointing where the part `trains`); `heads` run after them, in forward order, a unit each."""

    blocks: list[nn.Module]
    heads: list[nn.Module]
    trains: bool


class TrainModule(nn.Module):
    """The engine-facing contract; `forward(*inputs)` returns this rank's loss."""

    #: a model seed (models/init.py): every tensor's initial value is a function of it and its name
    init_seed: int = 0
    #: leading inputs of forward that are images (cast to a 16-bit module's dtype); the rest (targets) are not
    image_inputs: int = 1
    #: whether the backbone takes a step's images in one pass (no BatchNorm in it): FSDP chains its prefetches
    batch_views: bool = True

    def parts(self) -> list[Part]:
        raise NotImplementedError

    def init_rule(self, name: str) -> tuple[Rule, str]:
        raise NotImplementedError

    def trainable_named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """What the optimizer updates, in the optimizer state's order."""
        return [(n, p) for n, p in self.named_parameters() if p.requires_grad]

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.trainable_named_parameters()]

    def momentum_pairs(self) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
        """(name in the momentum encoder, momentum parameter, base parameter) of an EMA; none by default."""
        return []

    def first_layer_names(self) -> tuple[str, ...]:
        """Trainable first-layer parameters whose gradient norm a run logs."""
        return ()

    def check_backbone_chunk(self, chunk: int) -> None:
        if chunk:
            raise ValueError("backbone chunking is for MoCo pretraining (a loss over the whole per-rank batch); "
                             "set backbone_chunk to 0")
