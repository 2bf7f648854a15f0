"""Labelled images for evaluation and fine-tuning (lincls, knn, probe, finetune): train and val splits whose
classes are matched by name, transforms keyed to (seed, epoch, image) so that a run's batches do not depend on
the world size, and a sampler that shows every validation image exactly once whatever the world size."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from moco_scale.data.augment import eval_transform, keyed_rng
from moco_scale.data.datasets import DataError, image_folder, load_digits_split
from moco_scale.paths import folder_problem


@dataclass
class Splits:
    """Train and val samples ((image, label) sequences) with one class numbering: val's labels are train's."""

    train: Sequence
    val: Sequence
    classes: list[str]
    source: str


def matched_val(train_classes: list[str], val: Any, val_root: str) -> Any:
    """Relabel an ImageFolder `val` with train's class indices, by name; a val class train lacks is an error."""
    index = {c: i for i, c in enumerate(train_classes)}
    missing = [c for c in val.classes if c not in index]
    if missing:
        raise DataError(f"class folder {os.path.join(val_root, missing[0])} has no counterpart in train/ "
                        f"({len(missing)} val class(es) missing from train: {', '.join(missing[:5])}); "
                        "val's classes must be a subset of train's, matched by name")
    remap = [index[c] for c in val.classes]
    val.samples = [(path, remap[label]) for path, label in val.samples]
    val.targets = [remap[label] for label in val.targets]
    val.classes, val.class_to_idx = list(train_classes), dict(index)
    return val


def image_splits(data: str | None, image_size: int) -> Splits:
    """DATA/train and DATA/val as ImageFolders (classes matched by name), or the built-in digits' fixed
    stratified split."""
    if data is None:
        classes = [str(d) for d in range(10)]
        return Splits(load_digits_split("train", image_size), load_digits_split("val", image_size), classes,
                      "the built-in digits (held-out split)")
    if why := folder_problem(data):
        raise DataError(f"data folder {data} {why}")
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(data, split)):
            raise DataError(f"data folder {data} has no {split}/ folder (expected {data}/{split}/<class>/<image>)")
    train = image_folder(os.path.join(data, "train"))
    val = matched_val(train.classes, image_folder(os.path.join(data, "val")), os.path.join(data, "val"))
    return Splits(train, val, list(train.classes), data)


class Keyed(Dataset):
    """(transform(image), label) of `samples`; a key (epoch, index[, repeat]) seeds the transform's randomness
    (training; `every_generator`: Python's and NumPy's too, for timm's transforms), a plain index runs it as it
    is (evaluation transforms are deterministic)."""

    def __init__(self, samples: Sequence, transform: Callable, seed: int = 0, every_generator: bool = False) -> None:
        self.samples, self.transform, self.seed, self.every_generator = samples, transform, seed, every_generator

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, ...]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            img, label = self.samples[key[1]]
            with keyed_rng(self.seed, *key, every_generator=self.every_generator):
                return self.transform(img), label
        img, label = self.samples[key]
        return self.transform(img), label


class Shard(Sampler[int]):
    """Rank r's contiguous share of range(n), every index exactly once over the ranks (no padding, unlike
    DistributedSampler, whose duplicates would be counted twice in an accuracy)."""

    def __init__(self, n: int, world: int, rank: int) -> None:
        per = -(-n // world)
        self.indices = range(min(n, rank * per), min(n, (rank + 1) * per))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


def shard_loader(samples: Sequence, transform: Callable, batch_size: int, world: int, rank: int,
                 workers: int = 0) -> DataLoader:
    """This rank's share of `samples` (each image exactly once over the ranks) in evaluation batches. Its own
    generator: an evaluation in the middle of a run draws nothing from torch's global one, so the run's
    trajectory is the same with and without it."""
    return DataLoader(Keyed(samples, transform), batch_size=batch_size, sampler=Shard(len(samples), world, rank),
                      num_workers=workers, generator=torch.Generator())


def spread_subset(samples: Sequence, n: int | None) -> Sequence:
    """At most n samples spread evenly over `samples` (all of them when n is None or not smaller): every class
    of a class-sorted ImageFolder keeps its share."""
    if n is None or n >= len(samples):
        return samples
    return Subset(samples, [i * len(samples) // n for i in range(n)])


def split_transform(data: str | None, image_size: int) -> Callable:
    """The evaluation transform of a split: Resize 256 + CenterCrop 224 (scaled to the model's size) for an
    ImageFolder, none for the digits (already the model's size); then ToTensor + Normalize."""
    return eval_transform(image_size, resize=None if data is None else image_size * 256 // 224)


def knn_splits(data: str | None, image_size: int, train_size: int | None, world: int, k: int = 200) -> Splits:
    """The kNN's data: val whole, train spread down to `train_size`; each split must give every rank an image,
    and train at least the `k` neighbours the largest kNN votes with."""
    splits = image_splits(data, image_size)
    splits = replace(splits, train=spread_subset(splits.train, train_size))
    if min(len(splits.train), len(splits.val)) < world:
        raise DataError(f"{splits.source}: {min(len(splits.train), len(splits.val))} images in a split for "
                        f"{world} ranks")
    check_neighbours(splits, k, train_size)
    return splits


def check_neighbours(splits: Splits, k: int, train_size: int | None = None) -> None:
    """A kNN with fewer training images than k would vote with all of them and still be reported as k."""
    if len(splits.train) < k:
        cut = f" (--train-size {train_size})" if train_size is not None and train_size < k else ""
        raise DataError(f"{splits.source}: {len(splits.train)} training images{cut}, fewer than the k={k} "
                        "neighbours the kNN votes with")
