"""Projector and predictor MLPs with the reference's layout and key names."""

from __future__ import annotations

from torch import nn

from moco_scale.models.batchnorm import SyncBatchNorm


def build_mlp(num_layers: int, in_dim: int, mlp_dim: int, out_dim: int, last_bn: bool = True) -> nn.Sequential:
    """Linear(no bias) -> BN -> ReLU per hidden layer, then Linear (+ BN without affine); BN synced over ranks.

    The Sequential indices give the reference's state_dict keys (head.0.weight, head.1.*, ...).
    """
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else mlp_dim
        d_out = out_dim if i == num_layers - 1 else mlp_dim
        layers.append(nn.Linear(d_in, d_out, bias=False))
        if i < num_layers - 1:
            layers += [SyncBatchNorm(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            layers.append(SyncBatchNorm(d_out, affine=False))
    return nn.Sequential(*layers)
