"""Data for pretraining and evaluation: ImageFolder or the built-in digits."""

from __future__ import annotations

import os

from torch.utils.data import DataLoader

from moco_scale.data.augment import eval_transform, keyed_rng, two_view_transforms
from moco_scale.data.datasets import (
    BUILTIN_IMAGE_SIZE,
    DataError,
    KeyedTwoViews,
    image_folder,
    load_digits_split,
)
from moco_scale.data.sampler import GlobalBatchSampler


def pretrain_dataset(data: str | None, image_size: int, crop_min: float, seed: int,
                     skip_bad: bool = False) -> KeyedTwoViews:
    """Two-view dataset over DATA/train, or over the built-in digits when `data` is None.

    At the built-in 32 px the blur sigma is scaled by 32/224, so it blurs as much relative
    to the image as the reference's blur does at 224 px.
    """
    if data is None:
        base = load_digits_split("train", image_size)
        sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
    else:
        train = os.path.join(data, "train")
        if not os.path.isdir(data):
            raise DataError(f"data folder {data} does not exist")
        if not os.path.isdir(train):
            raise DataError(f"data folder {data} has no train/ folder (expected {train}/<class>/<image>)")
        base = image_folder(train, allow_empty=skip_bad)
        sigma = (0.1, 2.0)
    return KeyedTwoViews(base, two_view_transforms(image_size, crop_min, sigma), seed, skip_bad)


def pretrain_loader(dataset: KeyedTwoViews, global_batch: int, world_size: int, rank: int, seed: int,
                    workers: int, pin_memory: bool) -> DataLoader:
    sampler = GlobalBatchSampler(len(dataset), global_batch, world_size, rank, seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0)


__all__ = ["BUILTIN_IMAGE_SIZE", "DataError", "GlobalBatchSampler", "KeyedTwoViews", "eval_transform",
           "image_folder", "keyed_rng", "load_digits_split", "pretrain_dataset", "pretrain_loader",
           "two_view_transforms"]
