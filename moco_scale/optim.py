"""Optimizers as the reference uses them: AdamW for ViT, LARS for ResNet."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class LARS(torch.optim.Optimizer):
    """LARS with heavy-ball momentum; weight decay and trust ratio only for ndim > 1.

    d = g + wd p; d *= trust * ||p|| / ||d|| (1 where either norm is 0); mu = momentum mu + d;
    p -= lr mu. Parameters with ndim <= 1 (biases, BN) take the plain momentum update.
    `whole_norm` gives the norm of a whole parameter; a sharding engine replaces it with
    one that all-reduces the squared shard norms.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @staticmethod
    def whole_norm(t: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(t)

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = p.grad
                if p.ndim > 1:
                    d = d.add(p, alpha=group["weight_decay"])
                    p_norm, d_norm = self.whole_norm(p), self.whole_norm(d)
                    one = torch.ones_like(p_norm)
                    ratio = torch.where(p_norm > 0, torch.where(d_norm > 0, group["trust_coefficient"] * p_norm
                                                                / d_norm, one), one)
                    d = d.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d)
                p.add_(mu, alpha=-group["lr"])
        return loss


OPTIMIZERS = ("adamw", "lars")


def build_optimizer(name: str, params: Iterable[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer:
    """The lr is set every iteration by the schedule, so it starts at 0 here."""
    params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    if name == "lars":
        return LARS(params, lr=0.0, weight_decay=weight_decay, momentum=0.9, trust_coefficient=0.001)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join(OPTIMIZERS)}")
