"""Per-rank slices of global batches, identical across world sizes."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[tuple[int, int]]]):
    """Shuffle per epoch (seed + epoch, like DistributedSampler.set_epoch), cut the permutation
    into global batches (drop_last) and give rank r the r-th contiguous slice of each.

    Concatenating the ranks' batches in rank order gives exactly the single-process batch,
    so a run's global batches do not depend on the number of ranks. Items are (epoch, index)
    keys: the dataset derives each sample's augmentation randomness from them.

    `repeats` > 1 is DeiT's repeated augmentation (its RASampler): the epoch's order is the permutation with
    each index repeated `repeats` times in a row, cut to the dataset's length (as many images per epoch, a third
    of them distinct for 3), keys (epoch, index, repeat) so that each copy is augmented differently, and each
    global batch dealt to the ranks in turn (element j to rank j mod world), so the copies of an image land on
    different ranks as DeiT's do.
    """

    def __init__(self, num_samples: int, global_batch: int, world_size: int = 1, rank: int = 0,
                 seed: int = 0, repeats: int = 1) -> None:
        if global_batch % world_size:
            raise ValueError(f"global batch {global_batch} does not divide by world size {world_size}")
        if num_samples < global_batch:
            raise ValueError(f"the dataset has {num_samples} samples, fewer than one global batch "
                             f"of {global_batch}")
        self.num_samples, self.global_batch = num_samples, global_batch
        self.local_batch = global_batch // world_size
        self.rank, self.seed, self.world_size, self.repeats = rank, seed, world_size, repeats
        self.epoch = self.start = 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Batches of `epoch`, beginning at its `start`-th (a resume mid-epoch); len() stays the epoch's."""
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.num_samples // self.global_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        if self.repeats > 1:
            copies = torch.arange(self.repeats).repeat(self.num_samples)[:self.num_samples]
            order = order.repeat_interleave(self.repeats)[:self.num_samples]
            for i in range(self.start, len(self)):
                batch = range(i * self.global_batch + self.rank, (i + 1) * self.global_batch, self.world_size)
                yield [(self.epoch, int(order[j]), int(copies[j])) for j in batch]
            return
        for i in range(self.start, len(self)):
            start = i * self.global_batch + self.rank * self.local_batch
            yield [(self.epoch, int(j)) for j in order[start:start + self.local_batch]]
