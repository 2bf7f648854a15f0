"""Datasets: ImageFolder checked up front, and the built-in handwritten digits."""

from __future__ import annotations

import os
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.datasets import ImageFolder

from moco_scale.data.augment import keyed_rng
from moco_scale.paths import folder_problem

BUILTIN_IMAGE_SIZE = 32


class DataError(ValueError):
    """Missing, empty or unreadable data; the message names the path."""

    def __init__(self, message: str = "") -> None:
        # An error in a DataLoader worker comes back as DataError(the worker's whole traceback) (torch's
        # ExceptionWrapper); the user's line is its last, after the class name
        if message.startswith("Caught DataError in DataLoader worker"):
            message = message.rstrip().splitlines()[-1].split("DataError: ", 1)[-1]
        super().__init__(message)


#: 16-bit integer pixels (16-bit grayscale PNG, TIFF): PIL's RGB conversion clips them to 255 (a white image);
#: they are scaled to 8 bits instead
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N")


def faithful_rgb(img: Image.Image, path: str) -> Image.Image:
    """The picture a user sees, as 8-bit RGB: 16-bit pixels scaled (not clipped); pixels whose range is unknown
    (32-bit float "F", 32-bit integer "I" outside a PNG) refused with the file and its mode, not trained on as
    black or white."""
    if img.mode in SIXTEEN_BIT or (img.mode == "I" and img.format == "PNG"):  # PIL reads 16-bit PNGs as "I"
        pixels = np.asarray(img, dtype=np.uint32)
        return Image.fromarray((pixels >> 8).astype(np.uint8), mode="L").convert("RGB")
    if img.mode in ("F", "I"):
        kind = "32-bit float" if img.mode == "F" else "32-bit integer"
        raise DataError(f"cannot read image {path} faithfully: mode {img.mode} ({kind} pixels of unknown range); "
                        "convert it to 8- or 16-bit first, or skip it with --skip-bad-data")
    return img.convert("RGB")


def _load_rgb(path: str) -> Image.Image:
    try:
        with Image.open(path) as img:
            img.load()  # the pixels are read; leaving the block closes the file
    except Exception as e:  # PIL raises several types for a bad file
        why = "not an image file PIL can identify" if isinstance(e, UnidentifiedImageError) else str(e)
        raise DataError(f"cannot read image {path} ({why}); --skip-bad-data skips and counts such files") from e
    return faithful_rgb(img, path)


def image_folder(root: str, allow_empty: bool = False) -> ImageFolder:
    """ImageFolder over `root`, with errors that name the folder at fault (one scan of the tree)."""
    if why := folder_problem(root):
        raise DataError(f"data folder {root} {why}")
    try:
        ds = ImageFolder(root, loader=_load_rgb, allow_empty=True)
    except FileNotFoundError as e:  # no class folders at all
        raise DataError(f"data folder {root} has no class folders (expected {root}/<class>/<image>)") from e
    counts = Counter(ds.targets)
    empty = [os.path.join(root, c) for i, c in enumerate(ds.classes) if counts[i] == 0]
    if empty and not allow_empty:
        raise DataError(f"class folder {empty[0]} holds no images ({len(empty)} empty class folder(s); "
                        "--skip-bad-data skips them)")
    for path in empty:
        warnings.warn(f"skipping empty class folder {path}", stacklevel=2)
    return ds


def load_digits_split(split: str, image_size: int = BUILTIN_IMAGE_SIZE) -> list[tuple[Image.Image, int]]:
    """scikit-learn's handwritten digits (8x8, 10 classes, shipped with the package), upscaled to
    RGB `image_size`; a fixed stratified 80/20 split into 'train' and 'val'."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    idx_train, idx_val = train_test_split(np.arange(len(digits.target)), test_size=0.2,
                                          stratify=digits.target, random_state=0)
    idx = {"train": idx_train, "val": idx_val}[split]
    out = []
    for i in idx:
        pixels = (digits.images[i] * (255.0 / 16.0)).round().astype(np.uint8)
        img = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BICUBIC)
        out.append((img.convert("RGB"), int(digits.target[i])))
    return out


#: loader worker slots of the skip counter (workers per rank beyond it share slots)
MAX_WORKERS = 256


class KeyedTwoViews(Dataset):
    """The loader's part of two augmented views of sample `index`, drawn from a generator keyed to
    (seed, epoch, index); `on_device` is the part the training device does (data/feed.py runs it).

    `__getitem__` takes (epoch, index) keys from GlobalBatchSampler. With skip_bad, an unreadable
    image is replaced by the next readable one and counted in `skipped` (shared with workers).
    """

    def __init__(self, base: Sequence | Dataset, views: Callable[[Image.Image], Any], seed: int,
                 skip_bad: bool = False, collate: Callable | None = None,
                 on_device: Callable[[Any], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.base, self.views, self.seed, self.skip_bad = base, views, seed, skip_bad
        self.collate, self.on_device = collate, on_device
        #: skips counted per loader process (slot 0: the main process, 1 + i: worker i), each slot written by one
        #: process only, so no increment is lost; `skipped_count()` sums them
        self.skipped = torch.zeros(1 + MAX_WORKERS, dtype=torch.int64).share_memory_()

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        img = self._image(index)
        with keyed_rng(self.seed, epoch, index):
            return self.views(img)

    def _image(self, index: int) -> Image.Image:
        for offset in range(len(self.base)):
            try:
                return self.base[(index + offset) % len(self.base)][0]
            except DataError as e:
                if not self.skip_bad:
                    raise
                worker = torch.utils.data.get_worker_info()
                self.skipped[0 if worker is None else 1 + worker.id % MAX_WORKERS] += 1
                warnings.warn(f"{e}; skipped (--skip-bad-data)", stacklevel=2)
        raise DataError("no readable image in the dataset")

    def skipped_count(self) -> int:
        """Images skipped by this rank's loader processes so far."""
        return int(self.skipped.sum())
