"""Fine-tuning data: the splits (an ImageFolder's train/ and val/, torchvision's CIFAR-10/100, Flowers-102 and
Oxford-IIIT Pets read from a local root, never downloaded, or the built-in digits), the recipe's transforms from
timm's `create_transform`, and Mixup/CutMix (timm's, label smoothing folded in) applied on the device to each
rank's batch, its randomness keyed to (seed, step, rank) so that a resumed run draws what the uninterrupted one did.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torchvision
from PIL import Image
from timm.data import Mixup, create_transform
from timm.data.auto_augment import posterize
from torch.utils.data import ConcatDataset

from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, keyed_rng
from moco_scale.data.datasets import DataError
from moco_scale.data.feed import DeviceFeed
from moco_scale.data.labelled import Splits, image_splits
from moco_scale.paths import folder_problem
from moco_scale.train.recipes import Recipe

#: --dataset NAME: (torchvision class, train split(s), test split, what the root must hold)
TORCHVISION: dict[str, tuple[str, tuple[Any, ...], Any, str]] = {
    "cifar10": ("CIFAR10", (True,), False, "cifar-10-batches-py"),
    "cifar100": ("CIFAR100", (True,), False, "cifar-100-python"),
    "flowers": ("Flowers102", ("train", "val"), "test", "flowers-102"),  # train+val, as MoCo v3's transfer
    "pets": ("OxfordIIITPet", ("trainval",), "test", "oxford-iiit-pet"),
}


def _torchvision_split(name: str, root: str, split: Any) -> Any:
    cls_name, _, _, folder = TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    kwargs = {"train": split} if isinstance(split, bool) else {"split": split}
    try:
        return cls(root, download=False, **kwargs)
    except RuntimeError as e:  # torchvision's "Dataset not found or corrupted. You can use download=True ..."
        raise DataError(f"--dataset {name}: {os.path.join(root, folder)} is missing or incomplete ({e}); moco-scale "
                        f"never downloads: run `python -c \"import torchvision; torchvision.datasets.{cls_name}("
                        f"'{root}', download=True{'' if isinstance(split, bool) else f', split={split!r}'})\"` on a "
                        "machine with internet access and copy the folder here") from None


def finetune_splits(data: str | None, dataset: str | None, image_size: int) -> Splits:
    """--dataset NAME with DATA as its local root (torchvision's layout), an ImageFolder DATA with train/ and val/
    (classes matched by name), or the built-in digits."""
    if dataset is None:
        return image_splits(data, image_size)
    if dataset not in TORCHVISION:
        raise DataError(f"--dataset {dataset!r}: known datasets are {', '.join(TORCHVISION)} (or an ImageFolder "
                        "DATA without --dataset)")
    if data is None:
        raise DataError(f"--dataset {dataset} needs DATA: the local folder that holds {TORCHVISION[dataset][3]}/")
    if why := folder_problem(data):
        raise DataError(f"--dataset {dataset}: DATA {data} {why}")
    _, train_splits, test_split, _ = TORCHVISION[dataset]
    parts = [_torchvision_split(dataset, data, s) for s in train_splits]
    test = _torchvision_split(dataset, data, test_split)
    train = parts[0] if len(parts) == 1 else ConcatDataset(parts)
    classes = list(getattr(parts[0], "classes", None) or [str(c) for c in range(max(parts[0]._labels) + 1)])
    return Splits(train, test, classes, f"{dataset} in {data}")


def _posterize(img: Image.Image, bits_to_keep: int, **kwargs: Any) -> Image.Image:
    """timm's posterize where 0 bits is a black image, as in the Pillow DeiT trained with (Pillow 10+ refuses
    0 bits; RandAugment's 'inc1' posterize keeps 4 - int(level * 0.4) bits, 0 at the top magnitude)."""
    return Image.new(img.mode, img.size) if bits_to_keep <= 0 else posterize(img, bits_to_keep, **kwargs)


def _keep_pillow_semantics(transform: Any) -> Any:
    for t in getattr(transform, "transforms", ()):
        for op in getattr(t, "ops", ()):
            if getattr(op, "aug_fn", None) is posterize:
                op.aug_fn = _posterize
    return transform


def finetune_transforms(r: Recipe, image_size: int) -> tuple[Callable, Callable]:
    """The recipe's train transform (RandomResizedCrop at `train_scale`, flip, RandAugment `aa` (timm then skips
    color jitter), random erasing `reprob` in pixel mode; the transfer recipes: crop and flip only) and its
    evaluation transform (Resize size / eval_crop_pct, CenterCrop), both from timm's create_transform."""
    common = dict(input_size=image_size, interpolation=r.interpolation, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    train = create_transform(**common, is_training=True, scale=r.train_scale, hflip=0.5,
                             color_jitter=r.color_jitter,
                             auto_augment=r.aa, re_prob=r.reprob, re_mode="pixel", re_count=1)
    evaluate = create_transform(**common, is_training=False, crop_pct=r.eval_crop_pct)
    return _keep_pillow_semantics(train), evaluate


def mixup_of(r: Recipe, classes: int) -> Mixup | None:
    """DeiT's Mixup/CutMix (prob 1, batch mode, smoothing folded into the soft targets); None when both are off."""
    if not r.mixup_active:
        return None
    return Mixup(mixup_alpha=r.mixup, cutmix_alpha=r.cutmix, prob=1.0, switch_prob=r.mixup_switch_prob,
                 mode="batch", label_smoothing=r.smoothing, num_classes=classes)


class MixedFeed:
    """(images, targets) batches on `device`, mixed by `mixup` (if any) with NumPy's generator seeded from
    (seed, step, rank), and torch's generators seeded from the same key for the step's own draws (drop path):
    a resumed run draws what the uninterrupted one did. The step is read from the sampler's position when an
    epoch's iteration starts."""

    def __init__(self, loader: Iterable, sampler: Any, iters_per_epoch: int, device: torch.device,
                 mixup: Mixup | None, seed: int, rank: int) -> None:
        self.feed = DeviceFeed(loader, device, lambda batch: tuple(batch))
        self.sampler, self.iters, self.mixup, self.seed, self.rank = sampler, iters_per_epoch, mixup, seed, rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.sampler.epoch * self.iters + self.sampler.start
        for x, y in self.feed:
            key = np.random.SeedSequence([self.seed, step, self.rank]).generate_state(1, dtype=np.uint64)[0]
            if self.mixup is not None:
                with keyed_rng(self.seed, step, self.rank, every_generator=True):
                    x, y = self.mixup(x, y)
            torch.manual_seed(int(key) >> 1)
            step += 1
            yield x, y
