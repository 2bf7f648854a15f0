"""Data for pretraining and evaluation: ImageFolder or the built-in digits."""

from __future__ import annotations

import os

import torch
from torch.utils.data import DataLoader

from moco_scale.data.augment import TwoViews, eval_transform, keyed_rng, normalize, two_view_transforms
from moco_scale.data.datasets import (
    BUILTIN_IMAGE_SIZE,
    DataError,
    KeyedTwoViews,
    image_folder,
    load_digits_split,
)
from moco_scale.data.device_views import AugmentOnDevice, Collate, DeviceViews
from moco_scale.data.feed import DeviceFeed
from moco_scale.data.sampler import GlobalBatchSampler
from moco_scale.paths import folder_problem

AUGMENT = ("cpu", "device")


def normalize_views(views: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """`--augment cpu`'s part on the device: uint8 views to normalised float32."""
    return normalize(views[0]), normalize(views[1])


def pretrain_dataset(data: str | None, image_size: int, crop_min: float, seed: int,
                     skip_bad: bool = False, augment: str = "cpu") -> KeyedTwoViews:
    """Two-view dataset over DATA/train, or over the built-in digits when `data` is None.

    `augment` "cpu": the reference pipeline (PIL) in the loader workers, uint8 views out. "device": the
    workers decode and draw the parameters, the training device does every random op, batched.
    At the built-in 32 px the blur sigma is scaled by 32/224, so it blurs as much relative
    to the image as the reference's blur does at 224 px.
    """
    if augment not in AUGMENT:
        raise ValueError(f"--augment {augment!r}: expected one of {', '.join(AUGMENT)}")
    if data is None:
        base = load_digits_split("train", image_size)
        sigma = (0.1 * image_size / 224, 2.0 * image_size / 224)
    else:
        train = os.path.join(data, "train")
        if why := folder_problem(data):
            raise DataError(f"data folder {data} {why}")
        if not os.path.isdir(train):
            raise DataError(f"data folder {data} has no train/ folder (expected {train}/<class>/<image>)")
        base = image_folder(train, allow_empty=skip_bad)
        sigma = (0.1, 2.0)
    if augment == "cpu":
        return KeyedTwoViews(base, TwoViews(two_view_transforms(image_size, crop_min, sigma)), seed, skip_bad,
                             on_device=normalize_views)
    return KeyedTwoViews(base, DeviceViews(crop_min, sigma), seed, skip_bad, collate=Collate(),
                         on_device=AugmentOnDevice(image_size, sigma))


def pretrain_loader(dataset: KeyedTwoViews, global_batch: int, world_size: int, rank: int, seed: int,
                    workers: int, pin_memory: bool) -> DataLoader:
    sampler = GlobalBatchSampler(len(dataset), global_batch, world_size, rank, seed)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=pin_memory,
                      persistent_workers=workers > 0, collate_fn=dataset.collate)


__all__ = ["AUGMENT", "BUILTIN_IMAGE_SIZE", "DataError", "DeviceFeed", "GlobalBatchSampler", "KeyedTwoViews",
           "eval_transform", "image_folder", "keyed_rng", "load_digits_split", "normalize", "normalize_views",
           "pretrain_dataset", "pretrain_loader", "two_view_transforms"]
