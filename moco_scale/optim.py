"""Optimizers as the reference uses them: AdamW for ViT, LARS for ResNet; both multi-tensor and free of host
syncs (no `.item()` in a step), so the host runs ahead of the device."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Shard

if TYPE_CHECKING:
    from moco_scale.models.parts import TrainModule


def local_shard(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (what the optimizer updates); any other tensor as it is."""
    return t.to_local() if isinstance(t, DTensor) else t


def _sum_over_shards(values: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
    """Sums per-shard values over the ranks holding the other shards of `params`: one all-reduce for all of
    them (FSDP2 parameters are dim-0 shards of one mesh), none for plain tensors."""
    meshes = {p.device_mesh for p in params if isinstance(p, DTensor)}
    if not meshes:
        return values
    if len(meshes) > 1 or any(not all(isinstance(pl, Shard) for pl in p.placements) for p in params):
        raise ValueError("LARS sums squared norms over shards: every parameter must be sharded on one mesh")
    dist.all_reduce(values, group=meshes.pop().get_group())
    return values


class LARS(torch.optim.Optimizer):
    """LARS with heavy-ball momentum; weight decay and trust ratio only for ndim > 1.

    d = g + wd p; d *= trust * ||p|| / ||d|| (1 where either norm is 0); mu = momentum mu + d;
    p -= lr mu. Parameters with ndim <= 1 (biases, BN) take the plain momentum update.
    Multi-tensor (torch._foreach_*): the norms of all parameters are computed at once and stay on
    the device. Sharded (DTensor) parameters take their whole-parameter norms from one all-reduce
    of every shard's squared norms per step, not one per parameter.
    """

    def __init__(self, params: Iterable[nn.Parameter], lr: float = 0.0, weight_decay: float = 0.0,
                 momentum: float = 0.9, trust_coefficient: float = 0.001) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
            wide = [p for p in params if p.ndim > 1]
            flat = [p for p in params if p.ndim <= 1]
            updates = [local_shard(p.grad) for p in flat]
            if wide:
                w = [local_shard(p) for p in wide]
                d = torch._foreach_add([local_shard(p.grad) for p in wide], w, alpha=group["weight_decay"])
                squares = torch.stack(torch._foreach_norm([*w, *d])).square()
                p_norm, d_norm = _sum_over_shards(squares, wide).sqrt().chunk(2)
                ratio = torch.where((p_norm > 0) & (d_norm > 0), group["trust_coefficient"] * p_norm / d_norm,
                                    torch.ones_like(p_norm))
                torch._foreach_mul_(d, list(ratio.unbind()))
                updates = [*d, *updates]
            ordered = [*wide, *flat]
            mus = [local_shard(self.state[p]["mu"]) for p in ordered]
            torch._foreach_mul_(mus, group["momentum"])
            torch._foreach_add_(mus, updates)
            torch._foreach_add_([local_shard(p) for p in ordered], mus, alpha=-group["lr"])
        return loss


OPTIMIZERS = ("adamw", "lars")


def build_optimizer(name: str, params: Iterable[nn.Parameter] | list[dict[str, Any]],
                    weight_decay: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The lr is set every iteration by the schedule, so it starts at 0 here. `params` may be parameter groups
    (dicts that carry their own "weight_decay" and an "lr_scale" the engines apply when they set the lr).

    AdamW is torch's fused implementation, on CUDA and on the CPU alike: foreach and the per-parameter loop
    read each parameter's step counter with `.item()` unless capturable, which the CPU is not; fused keeps the
    counters with the kernel (and takes GradScaler's inverse scale and inf flag on the device). SGD (linear
    evaluation) takes `momentum` (0.9, as the reference's linear evaluation)."""
    params = list(params)
    if params and not isinstance(params[0], dict):
        params = [p for p in params if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=0.0, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay,
                                 fused=True)
    if name == "lars":
        return LARS(params, lr=0.0, weight_decay=weight_decay, momentum=0.9, trust_coefficient=0.001)
    if name == "sgd":
        return torch.optim.SGD(params, lr=0.0, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; known: {', '.join((*OPTIMIZERS, 'sgd'))}")


@dataclass(frozen=True)
class OptimizerSpec:
    """The optimizer a command asks of an engine, which builds it over the model it holds (after sharding, so
    the state follows the engine's layout). `groups` gives parameter groups from the model (fine-tuning: weight
    decay off for 1-D tensors and tokens, a layer-decay `lr_scale` per group); None is one group of every
    trainable parameter, as the reference has. Empty groups are dropped (DeepSpeed >= 0.18 drops them itself,
    and the lr scales would no longer line up)."""

    name: str = "adamw"
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD's
    groups: Callable[[TrainModule], list[dict[str, Any]]] | None = None

    def build(self, model: TrainModule) -> torch.optim.Optimizer:
        if self.groups is None:
            return build_optimizer(self.name, model.trainable_parameters(), self.weight_decay, self.momentum)
        groups = [g for g in self.groups(model) if g["params"]]
        return build_optimizer(self.name, groups, self.weight_decay, self.momentum)
