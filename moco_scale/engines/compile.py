"""Per-block torch.compile (`"compile": true` in a DDP or FSDP engine JSON), as torchtitan's regional compile.

Each backbone block of both encoders is compiled in place (`nn.Module.compile`), so module names, state-dict
keys and the sharding plan stay as they are. The blocks share one class and one shape, so Dynamo traces a
block once per grad mode (the base encoder's training forward, the momentum encoder's no-grad one) and
reuses it for every other block; what runs between blocks (patch embedding, heads, loss, FSDP's gathers)
stays eager. It comes after activation checkpointing (the recompute is traced into the block's graph) and
before the engine wraps or shards the model.
"""

from __future__ import annotations

from moco_scale.config import ConfigError
from moco_scale.models import MoCo, backbone_blocks
from moco_scale.models.batchnorm import has_batchnorm


def compile_blocks(model: MoCo, on: bool) -> int:
    """Compile every backbone block of both encoders (when `on`); returns how many were compiled."""
    if not on:
        return 0
    blocks = [*backbone_blocks(model.base_encoder), *backbone_blocks(model.momentum_encoder)]
    if any(has_batchnorm(block) for block in blocks):
        raise ConfigError("engine config: key 'compile' is for ViT backbones: this backbone's blocks hold "
                          "(synchronised) BatchNorm, whose statistics all-reduce would split each compiled graph; "
                          "set \"compile\": false")
    for block in blocks:
        block.compile(fullgraph=True)  # fullgraph: a graph break inside a block is a bug to see, not to absorb
    return len(blocks)
