"""Engine steps on given batches, timed: what benchmarks and the GPU equivalence check run (a run's steps go
through Trainer.train_step, which adds schedules over epochs, the meter, the logs and the save cadence)."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from moco_scale.engines.base import Engine


@dataclass
class Step:
    loss: torch.Tensor  # this rank's loss, detached
    seconds: float  # wall time of the step, the device synchronised before and after


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_steps(engine: Engine, batches: Iterable[Sequence[torch.Tensor]],
              schedule: Callable[[int], tuple[float, float | None]] = lambda t: (1e-4, 0.99),
              after_backward: Callable[[int], None] | None = None) -> list[Step]:
    """One engine step per batch at `schedule(t)` = (lr, momentum m or None); `after_backward(t)` runs between
    backward and the optimizer step (what only then exists: gradients, counted by bench_engines.py)."""
    steps = []
    for t, batch in enumerate(batches):
        lr, m = schedule(t)
        synchronize(engine.ctx.device)
        start = time.perf_counter()
        if after_backward is None:
            loss = engine.train_step(batch, lr, m)
        else:
            if m is not None:
                engine.update_momentum(m)
            loss = engine.forward(*batch)
            engine.backward(loss)
            after_backward(t)
            engine.step(lr)
        synchronize(engine.ctx.device)
        steps.append(Step(loss.detach(), time.perf_counter() - start))
    return steps
