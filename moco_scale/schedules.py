"""Learning-rate and momentum schedules of MoCo v3: pure functions of the fractional epoch."""

from __future__ import annotations

import math


def scaled_lr(base_lr: float, global_batch: int) -> float:
    """The linear scaling rule: lr = base_lr * batch / 256."""
    return base_lr * global_batch / 256


def learning_rate(epoch: float, lr: float, epochs: int, warmup_epochs: float) -> float:
    """Linear warmup from exactly 0, then a half-cycle cosine to 0; `epoch` is fractional."""
    if epoch < warmup_epochs:
        return lr * epoch / warmup_epochs
    return lr * 0.5 * (1.0 + math.cos(math.pi * (epoch - warmup_epochs) / (epochs - warmup_epochs)))


def momentum(epoch: float, m0: float, epochs: int, cosine: bool) -> float:
    """m0 constant, or (--moco-m-cos) 1 - 0.5 (1 + cos(pi ep / epochs)) (1 - m0)."""
    if not cosine:
        return m0
    return 1.0 - 0.5 * (1.0 + math.cos(math.pi * epoch / epochs)) * (1.0 - m0)
