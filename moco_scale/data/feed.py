"""Loader batches to the training device: pinned host memory, non-blocking copies, and on CUDA the next
batch's copy on a side stream while the current step runs; then the device's part of the augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch

Views = tuple[torch.Tensor, torch.Tensor]


def batch_tensors(batch: Any) -> list[torch.Tensor]:
    """The tensors of a loader batch: a tuple of views, or a DecodedBatch."""
    return list(batch) if isinstance(batch, tuple | list) else batch.tensors()


def to_device(batch: Any, device: torch.device) -> Any:
    """A tuple of tensors, or an object with `.to` (DecodedBatch), copied without blocking the host."""
    if isinstance(batch, tuple | list):
        return type(batch)(t.to(device, non_blocking=True) for t in batch)
    return batch.to(device, non_blocking=True)


class DeviceFeed:
    """Iterates `loader` as (view 1, view 2) normalised float32 batches on `device`, made by `prepare` there.

    On CUDA the copy of batch i + 1 is queued on a side stream before batch i is handed out, so the transfer
    overlaps step i; the consumer's stream waits for it and the tensors are marked used there, so that the
    caching allocator does not hand their memory to the side stream too soon.
    """

    def __init__(self, loader: Iterable, device: torch.device, prepare: Callable[[Any], Views]) -> None:
        self.loader, self.device, self.prepare = loader, device, prepare
        self.stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def _copy(self, batch: Any) -> Any:
        if batch is None:
            return None
        if self.stream is None:
            return to_device(batch, self.device)
        with torch.cuda.stream(self.stream):
            return to_device(batch, self.device)

    def _ready(self, batch: Any) -> Any:
        if self.stream is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_stream(self.stream)
            for t in batch_tensors(batch):
                t.record_stream(current)
        return batch

    def __iter__(self) -> Iterator[Views]:
        it = iter(self.loader)
        ahead = self._copy(next(it, None))
        while ahead is not None:
            yield self.prepare(self._ready(ahead))
            ahead = self._copy(next(it, None))  # the step just queued runs meanwhile

