"""ResNets from torchvision with zero-init residual branches and BN synced over ranks, as the reference
builds them (the values: models/init.py)."""

from __future__ import annotations

import torch
from torchvision.models import resnet
from torchvision.models.resnet import BasicBlock, ResNet

from moco_scale.models.batchnorm import SyncBatchNorm

RESNET_ARCHS = {
    "resnet50": lambda: resnet.resnet50(norm_layer=SyncBatchNorm),
    "resnet18": lambda: resnet.resnet18(norm_layer=SyncBatchNorm),
    # one BasicBlock per stage: a ResNet small enough for tests on CPU
    "resnet_tiny": lambda: ResNet(BasicBlock, [1, 1, 1, 1], norm_layer=SyncBatchNorm),
}


def build_resnet(arch: str) -> ResNet:
    return RESNET_ARCHS[arch]()


def resnet_features(model: ResNet, x: torch.Tensor) -> torch.Tensor:
    """The pooled features that `fc` (the projector) consumes."""
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    x = model.layer4(model.layer3(model.layer2(model.layer1(x))))
    return torch.flatten(model.avgpool(x), 1)
