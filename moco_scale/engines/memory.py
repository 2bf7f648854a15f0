"""The planner's view of a model (moco-scale plan): parameter shapes by role, and the element counts each
engine's byte model (`Engine.state_bytes`, `comm_bytes`, `buffer_bytes`) is written in. A test holds the
engines' figures equal to the tensors they allocate."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moco_scale.models.parts import TrainModule


@dataclass
class Shapes:
    """Parameter shapes by role, in the order the engines see them."""

    trainable: list[torch.Size]  # what the optimizer updates (MoCo: base encoder then predictor)
    frozen: list[torch.Size]  # parameters without gradient outside a momentum encoder (fixed position embedding)
    momentum: list[torch.Size]  # every momentum-encoder parameter
    momentum_twins: list[torch.Size]  # momentum twins of trainable base-encoder parameters (updated by the EMA)


def model_shapes(model: TrainModule) -> Shapes:
    trainable = model.trainable_parameters()
    pairs = model.momentum_pairs()
    momentum_module = getattr(model, "momentum_encoder", None)
    momentum = list(momentum_module.parameters()) if momentum_module is not None else []
    ids = {id(p) for p in (*trainable, *momentum)}
    frozen = [p.shape for p in model.parameters() if id(p) not in ids]
    return Shapes([p.shape for p in trainable], frozen, [p.shape for p in momentum], [m.shape for _, m, _ in pairs])


def numel(shapes: list[torch.Size]) -> int:
    return sum(math.prod(s) for s in shapes)


def fsdp_shard(shape: torch.Size, world: int, rank: int) -> int:
    """Elements of `shape` on `rank` under FSDP2's dim-0 chunking (torch.chunk: ceil-sized row blocks)."""
    if len(shape) == 0:
        return 1 if rank == 0 else 0
    rows = math.ceil(shape[0] / world)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * math.prod(shape[1:])


def z3_part(shapes: list[torch.Size], world: int) -> int:
    """Elements of ZeRO-3's per-parameter flat ceil(n / world) partitions on one rank."""
    return sum(math.ceil(math.prod(s) / world) for s in shapes)


def ring(world: int) -> float:
    """The share of a tensor one rank sends in a ring all-gather or reduce-scatter (twice that: all-reduce)."""
    return (world - 1) / world


def optimizer_state(optimizer: str) -> tuple[int, int]:
    """(moment tensors per parameter, bytes of per-tensor scalars): AdamW's two moments and one 0-d fp32 step
    per parameter tensor it updates, LARS's heavy-ball buffer."""
    return (2, 4) if optimizer == "adamw" else (1, 0)
