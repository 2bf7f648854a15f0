"""The model's preparation for an engine, in one order for every engine (as DINOv3's ac_compile_parallelize
and torchtitan's parallelize): 1. activation checkpointing, 2. torch.compile, 3. chunking, 4. sharding or
wrapping (the engine's own step), then 5. the values, placed shard by shard.

A model arrives on the meta device (`build_moco(..., device="meta")`), so no rank ever holds the whole model
on its device before sharding: FSDP shards the meta model and fills its local shards module by module,
ZeRO-3 fills one unit (a block, a head) at a time and partitions it before the next; the values come from
an `InitialState` (the model's seed, or a state dict). A real model is taken over the same way: its tensors
become the state and the model goes to the meta device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.utils.checkpoint import checkpoint

from moco_scale.config import ConfigError
from moco_scale.engines.config import EngineConfig
from moco_scale.models.batchnorm import has_batchnorm
from moco_scale.models.init import InitialState, direct_tensors, owners
from moco_scale.models.parts import TrainModule


# -- 1. activation checkpointing ------------------------------------------------------------------------
def _checkpointed(block: nn.Module) -> None:
    """Non-reentrant recomputation of `block` in backward; the forward is replaced on the instance, so module
    names and state-dict keys stay as they are and a sharding engine wraps the block as usual."""
    inner = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save for backward: run it plainly
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def apply_activation_checkpointing(model: TrainModule, every: int) -> int:
    """Recompute every `every`-th block of the parts that train (0: off, 1: all blocks); a momentum encoder
    runs without autograd and keeps no activations. Returns the number of checkpointed blocks."""
    if every == 0:
        return 0
    chosen = [block for part in model.parts() if part.trains for block in part.blocks[every - 1::every]]
    for block in chosen:
        _checkpointed(block)
    return len(chosen)


# -- 2. compile -------------------------------------------------------------------------------------
def compile_blocks(model: TrainModule, on: bool) -> int:
    """Per-block torch.compile (torchtitan's regional compile) of every part's blocks, in place, so names, keys
    and the sharding plan stay. The blocks share one class and shape: Dynamo traces one per grad mode."""
    if not on:
        return 0
    blocks = [block for part in model.parts() for block in part.blocks]
    if any(has_batchnorm(block) for block in blocks):
        raise ConfigError("engine config: key 'compile' is for ViT backbones: this backbone's blocks hold "
                          "(synchronised) BatchNorm, whose statistics all-reduce would split each compiled graph; "
                          "set \"compile\": false")
    for block in blocks:
        block.compile(fullgraph=True)  # fullgraph: a graph break inside a block is a bug to see, not to absorb
    return len(blocks)


# -- the order ----------------------------------------------------------------------------------------
def prepare(model: TrainModule, cfg: EngineConfig, phased_chunks: bool, shard: Callable[[], None]) -> None:
    """Checkpointing, compile (after checkpointing: the recompute is traced into the block), chunking (the
    model runs it inside forward, or `phased_chunks`: the engine runs its phases), then the engine's `shard`."""
    apply_activation_checkpointing(model, cfg.activation_checkpointing)
    compile_blocks(model, cfg.compile)
    try:
        model.check_backbone_chunk(cfg.backbone_chunk)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.backbone_chunk and not phased_chunks:
        model.set_backbone_chunk(cfg.backbone_chunk)  # type: ignore[attr-defined]
    shard()


# -- 5. values ------------------------------------------------------------------------------------------
def is_meta(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


def take_state(model: TrainModule, initial: InitialState | None) -> InitialState:
    """Where the values come from: `initial`, else a meta model's seed, else a real model's own tensors (the
    model then goes to the meta device; the state keeps its tensors)."""
    if initial is not None:
        if not is_meta(model):
            model.to("meta")
        return initial
    if is_meta(model):
        return InitialState(model)
    state = InitialState(model, {k: v.detach() for k, v in model.state_dict().items()})
    model.to("meta")
    return state


def _place_whole(module: nn.Module, values: dict[str, torch.Tensor], device: torch.device,
                 dtype: torch.dtype | None) -> None:
    for key, value in values.items():
        if key in module._parameters:  # a meta parameter cannot take real data: a new Parameter replaces it
            old = module._parameters[key]
            cast = dtype if dtype is not None and value.is_floating_point() else value.dtype
            module._parameters[key] = nn.Parameter(value.to(device, cast), requires_grad=old.requires_grad)
        else:
            module._buffers[key] = value.to(device)


def materialize_whole(model: TrainModule, state: InitialState, device: torch.device,
                      dtype: torch.dtype | None = None) -> None:
    """Every tensor on `device` whole (a replicated engine), module by module; parameters in `dtype` if given."""
    for name, module in owners(model):
        _place_whole(module, state.values(name, module), device, dtype)


@torch.no_grad()
def materialize_shards(model: TrainModule, state: InitialState, device: torch.device) -> None:
    """After FSDP2 sharded the meta model: allocate the local shards, then fill each from its module's values
    (every rank computes the same full tensors and keeps its own slice: no communication)."""
    model.to_empty(device=device)
    for name, module in owners(model):
        values = state.values(name, module)
        for key, dst in direct_tensors(module).items():
            full = values[key].to(device, dst.dtype)
            if isinstance(dst, DTensor):
                dst.to_local().copy_(distribute_tensor(full, dst.device_mesh, dst.placements,
                                                       src_data_rank=None).to_local())
            else:
                dst.copy_(full)


def materialize_units(model: TrainModule, state: InitialState, device: torch.device, dtype: torch.dtype | None,
                      partition: Callable[[nn.Module], None]) -> None:
    """One unit at a time (each block and head of every part, then the rest): its tensors whole on `device`,
    then `partition(unit)` (ZeRO-3) before the next unit is placed; the peak is the shards plus one unit."""
    names = {id(m): n for n, m in model.named_modules()}
    units = [*(m for part in model.parts() for m in (*part.blocks, *part.heads)), model]
    placed: set[int] = set()
    for unit in units:
        for module in unit.modules():
            if id(module) in placed or not direct_tensors(module):
                continue
            placed.add(id(module))
            _place_whole(module, state.values(names[id(module)], module), device, dtype)
        partition(unit)
