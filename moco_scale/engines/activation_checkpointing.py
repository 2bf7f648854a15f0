"""Per-block activation checkpointing (non-reentrant) that keeps module names and state-dict keys.

The block's forward is replaced on the instance, so sharding engines can wrap the block as usual
and checkpoints, the momentum copy and conversions see the same key names as without it.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from moco_scale.models import MoCo, backbone_blocks


def _checkpointed(block: nn.Module) -> None:
    inner = block.forward

    def forward(*args, **kwargs):
        if not torch.is_grad_enabled():  # nothing to save for backward: run it plainly
            return inner(*args, **kwargs)
        return checkpoint(inner, *args, use_reentrant=False, **kwargs)

    block.forward = forward


def apply_activation_checkpointing(model: MoCo, every: int) -> int:
    """Recompute every `every`-th block of the base encoder in backward (0: off, 1: all blocks).

    The momentum encoder runs without autograd and keeps no activations, so it is left alone.
    Returns the number of checkpointed blocks.
    """
    if every < 0:
        raise ValueError(f"activation_checkpointing must be 0 (off), 1 (every block) or k (every k-th), got {every}")
    if every == 0:
        return 0
    blocks = backbone_blocks(model.base_encoder)
    chosen = blocks[every - 1::every]
    for block in chosen:
        _checkpointed(block)
    return len(chosen)
