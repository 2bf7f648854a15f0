"""The planner's model of each engine (moco-scale plan): bytes of model state a rank keeps, bytes it sends
per step, and the buffers an engine allocates, from the model's parameter shapes. Per engine, so it lives
with the engines; a test holds these figures equal to the tensors the engines allocate."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from moco_scale.config import ConfigError
from moco_scale.models import MoCo


@dataclass
class Shapes:
    """Parameter shapes by role, in the order the engines see them."""

    trainable: list[torch.Size]  # base encoder then predictor, requires_grad (what the optimizer updates)
    frozen: list[torch.Size]  # base/predictor parameters without gradient (fixed position embedding, ...)
    momentum: list[torch.Size]  # every momentum-encoder parameter
    momentum_twins: list[torch.Size]  # momentum twins of trainable base-encoder parameters (updated by the EMA)


def model_shapes(model: MoCo) -> Shapes:
    trainable = model.trainable_parameters()
    ids = {id(p) for p in trainable}
    frozen = [p.shape for p in (*model.base_encoder.parameters(), *model.predictor.parameters()) if id(p) not in ids]
    twins = [m.shape for _, m, _ in model.momentum_pairs()]
    return Shapes([p.shape for p in trainable], frozen, [p.shape for p in model.momentum_encoder.parameters()], twins)


def _numel(shapes: list[torch.Size]) -> int:
    return sum(math.prod(s) for s in shapes)


def _fsdp_shard(shape: torch.Size, world: int, rank: int) -> int:
    """Elements of `shape` on `rank` under FSDP2's dim-0 chunking (torch.chunk: ceil-sized row blocks)."""
    if len(shape) == 0:
        return 1 if rank == 0 else 0
    rows = math.ceil(shape[0] / world)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * math.prod(shape[1:])


def _z3_part(shapes: list[torch.Size], world: int) -> int:
    return sum(math.ceil(math.prod(s) / world) for s in shapes)


def engine_kind(cfg: dict[str, Any]) -> str:
    return f"zero{cfg['zero_stage']}" if cfg["engine"] == "deepspeed" else cfg["engine"]


def model_state_bytes(shapes: Shapes, cfg: dict[str, Any], world: int, rank: int = 0, precision: str = "fp32",
                      optimizer: str = "adamw") -> dict[str, int]:
    """Bytes of parameters, gradients, optimizer state and momentum encoder that stay allocated on `rank`.

    Optimizer state: AdamW's two moments and one 0-d step per parameter tensor (one per flat partition under
    ZeRO), LARS's heavy-ball buffer; plus the fp32 masters an engine keeps beside 16-bit (or, in ZeRO 1-3, its
    own copy of fp32) parameters. The momentum encoder includes its fp32 copy where the module holds 16 bits.
    """
    kind = engine_kind(cfg)
    low = precision in ("bf16", "fp16")
    c = 2 if low and kind.startswith("zero") else 4  # DDP autocasts and FSDP casts on the fly: fp32 storage
    moments = 2 if optimizer == "adamw" else 1
    steps = 4 if optimizer == "adamw" else 0  # AdamW's 0-d float32 step, per tensor it updates
    n_t, n_f, n_m = _numel(shapes.trainable), _numel(shapes.frozen), _numel(shapes.momentum)
    if kind == "ddp" or (kind == "zero0" and not low):
        return {"parameters": 4 * (n_t + n_f), "gradients": 4 * n_t, "momentum": 4 * n_m,
                "optimizer": 4 * moments * n_t + steps * len(shapes.trainable)}
    if kind == "zero0":  # 16-bit module, whole fp32 masters (and an fp32 momentum copy) on every rank
        return {"parameters": c * (n_t + n_f), "gradients": c * n_t,
                "momentum": c * n_m + 4 * _numel(shapes.momentum_twins),
                "optimizer": 4 * n_t + 4 * moments * n_t + steps * len(shapes.trainable)}
    if kind == "fsdp":
        local = lambda shapes_: sum(_fsdp_shard(s, world, rank) for s in shapes_)  # noqa: E731
        t = local(shapes.trainable)
        return {"parameters": 4 * (t + local(shapes.frozen)), "gradients": 4 * t,
                "momentum": 4 * local(shapes.momentum), "optimizer": 4 * moments * t + steps * len(shapes.trainable)}
    if kind in ("zero1", "zero2"):
        align = 2 * world
        part = math.ceil(n_t / align) * align // world
        fragments = max(0, min(part, _numel(shapes.momentum_twins) - rank * part)) if low else 0
        return {"parameters": c * (n_t + n_f), "gradients": c * part, "momentum": c * n_m + 4 * fragments,
                "optimizer": 4 * part + 4 * moments * part + steps}
    if kind == "zero3":
        part = _z3_part(shapes.trainable, world)
        offload = bool(cfg["deepspeed"]["zero_optimization"].get("offload_optimizer"))
        return {"parameters": c * (part + _z3_part(shapes.frozen, world)), "gradients": c * part,
                "momentum": c * _z3_part(shapes.momentum, world) + (4 * _z3_part(shapes.momentum_twins, world)
                                                                       if low else 0),
                "optimizer": 0 if offload else 4 * part + 4 * moments * part + steps}
    raise ConfigError(f"the planner does not know engine {kind!r}")


def comm_bytes(shapes: Shapes, cfg: dict[str, Any], world: int, precision: str, chunks: int = 1,
               global_batch: int = 0, moco_dim: int = 256) -> int:
    """Bytes one rank sends per step (ring algorithms: all-gather and reduce-scatter send (w-1)/w of the
    whole, all-reduce twice that). Chunks: under ZeRO-3 each chunk gathers and reduces again."""
    if world == 1:
        return 0
    kind = engine_kind(cfg)
    low = precision in ("bf16", "fp16")
    ring = (world - 1) / world
    n_t, n_m = _numel(shapes.trainable) + _numel(shapes.frozen), _numel(shapes.momentum)
    p = 2 if low else 4  # bytes of a gathered parameter
    keys = 2 * ring * global_batch * moco_dim * 4  # both views' keys gathered for the InfoNCE
    if kind in ("ddp", "zero0"):
        grads = 2 * ring * _numel(shapes.trainable) * (2 if low and kind == "zero0" else 4)
        return int(grads + keys)
    if kind == "fsdp":
        reduce = 4 if cfg.get("reduce_dtype", "fp32") == "fp32" else 2
        base_gathers = 1 if chunks > 1 or not cfg.get("reshard_after_forward", True) else 2
        return int(ring * (base_gathers * n_t * p + n_m * p + _numel(shapes.trainable) * reduce) + keys)
    if kind in ("zero1", "zero2"):
        momentum = 2 * ring * _numel(shapes.momentum_twins) * 2 if low else 0  # the 16-bit rebuild all-reduce
        return int(ring * _numel(shapes.trainable) * (p + p) + momentum + keys)
    grads = ring * _numel(shapes.trainable) * p
    return int(ring * (chunks * 2 * n_t * p + chunks * n_m * p) + chunks * grads + keys)  # zero3


def buffer_bytes(shapes: Shapes, cfg: dict[str, Any], precision: str, chunk: int) -> int:
    """Buffers beside the model state: FSDP's gathered backbone with fp32 gradient sums while chunking, ZeRO's
    reduce bucket."""
    kind = engine_kind(cfg)
    if kind == "fsdp" and chunk:  # the backbone stays gathered (compute dtype) with fp32 gradient sums
        return _numel(shapes.trainable) * ((2 if precision != "fp32" else 4) + 4)
    if kind.startswith("zero") and kind != "zero0":
        zero = cfg["deepspeed"].get("zero_optimization", {})
        return int(zero.get("reduce_bucket_size", 5e8)) * (2 if precision != "fp32" else 4)
    return 0
