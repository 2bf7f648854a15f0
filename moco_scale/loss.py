"""Distributed InfoNCE of MoCo v3 as a pure function of (q, k, T)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moco_scale.dist import all_gather_flat, get_rank, get_world_size


@torch.no_grad()
def gather_keys(k: torch.Tensor) -> torch.Tensor:
    """All ranks' keys concatenated in rank order; no gradient flows through them."""
    world = get_world_size()
    if world == 1:
        return k
    out = torch.empty((world * k.shape[0], *k.shape[1:]), dtype=k.dtype, device=k.device)
    all_gather_flat(out, k.contiguous())
    return out


def contrastive_loss(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """CE of local queries against the global keys, positives at arange(N) + N * rank, times 2T.

    Computed in fp32 at least, whatever precision the encoders ran in: autocast is switched off here, since
    under it `q @ k.t()` would run in 16 bits whatever the inputs' dtype."""
    dtype = torch.promote_types(q.dtype, torch.float32)
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.to(dtype), dim=1)
        k = gather_keys(F.normalize(k.to(dtype), dim=1))
        logits = q @ k.t() / temperature
        labels = torch.arange(q.shape[0], device=q.device) + q.shape[0] * get_rank()
        return F.cross_entropy(logits, labels) * (2 * temperature)


def symmetric_loss(q1: torch.Tensor, q2: torch.Tensor, k1: torch.Tensor, k2: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    return contrastive_loss(q1, k2, temperature) + contrastive_loss(q2, k1, temperature)
