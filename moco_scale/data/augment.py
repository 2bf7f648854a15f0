"""MoCo v3's two asymmetric views (`--augment cpu`, the reference pipeline), with randomness keyed to
(seed, epoch, sample). The views leave the loader as uint8; `normalize` runs on the training device.

Every random draw of torchvision's transforms comes from torch's CPU generator, so
seeding that generator per sample makes a crop's pixels a function of its key
alone: the same global batch whatever the world size, loader workers or resume point.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VIEWS = ((1.0, 0.0), (0.1, 0.2))  # (blur p, solarize p): view 1 always blurred, never solarized
JITTER, JITTER_P, GRAY_P, FLIP_P = (0.4, 0.4, 0.2, 0.1), 0.8, 0.2, 0.5  # brightness, contrast, saturation, hue
SOLARIZE_AT = 128


@contextlib.contextmanager
def keyed_rng(*key: int, every_generator: bool = False) -> Iterator[None]:
    """Seed torch's CPU generator from `key` inside the block and restore it after; with `every_generator`
    Python's `random` and NumPy's global generator too (timm's transforms draw from them)."""
    seed = int(np.random.SeedSequence([int(k) for k in key]).generate_state(1, dtype=np.uint64)[0])
    state = torch.get_rng_state()
    others = (random.getstate(), np.random.get_state()) if every_generator else None
    torch.default_generator.manual_seed(seed)
    if others is not None:
        random.seed(seed)
        np.random.seed(seed % 2**32)
    try:
        yield
    finally:
        torch.set_rng_state(state)
        if others is not None:
            random.setstate(others[0])
            np.random.set_state(others[1])


class GaussianBlur:
    """PIL Gaussian blur with radius sigma ~ U[lo, hi] (the reference's blur)."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        sigma = torch.empty(1).uniform_(*self.sigma).item()
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


def view_transform(image_size: int, crop_min: float, blur_p: float, solarize_p: float,
                   blur_sigma: tuple[float, float] = (0.1, 2.0)) -> T.Compose:
    return T.Compose([
        T.RandomResizedCrop(image_size, scale=(crop_min, 1.0)),
        T.RandomApply([T.ColorJitter(*JITTER)], p=JITTER_P),
        T.RandomGrayscale(p=GRAY_P),
        T.RandomApply([GaussianBlur(blur_sigma)], p=blur_p),
        T.RandomSolarize(threshold=SOLARIZE_AT, p=solarize_p),
        T.RandomHorizontalFlip(p=FLIP_P),
        T.PILToTensor(),
    ])


def two_view_transforms(image_size: int, crop_min: float,
                        blur_sigma: tuple[float, float] = (0.1, 2.0)) -> tuple[T.Compose, T.Compose]:
    """View 1: blur always, never solarize. View 2: blur p=0.1, solarize p=0.2. uint8 CHW out."""
    return tuple(view_transform(image_size, crop_min, blur_p, solarize_p, blur_sigma)  # type: ignore[return-value]
                 for blur_p, solarize_p in VIEWS)


class TwoViews:
    """Both views of one image, from the same generator (view 1 drawn first)."""

    def __init__(self, views: tuple[T.Compose, T.Compose]) -> None:
        self.views = views

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        return self.views[0](img), self.views[1](img)


@functools.cache
def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Made once per device: a copy from pageable host memory would wait for the device's queue each step."""
    return (torch.tensor(IMAGENET_MEAN, device=device).view(-1, 1, 1),
            torch.tensor(IMAGENET_STD, device=device).view(-1, 1, 1))


def normalize(x: torch.Tensor, scaled: bool = False, out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 (or, with `scaled`, float in [0, 1]) images (..., 3, H, W) to ImageNet-normalised float32, on
    their own device (into `out` if given): the same arithmetic as ToTensor + Normalize, so the pixels match
    the reference's bit for bit."""
    mean, std = _mean_std(x.device)
    x = x.float() if scaled else x.float().div_(255)
    return torch.sub(x, mean, out=out).div_(std)


def eval_transform(image_size: int, resize: int | None = None) -> T.Compose:
    """Resize + center crop (256/224 at ImageNet scale) for frozen-feature evaluation."""
    steps: list = []
    if resize is not None:
        steps += [T.Resize(resize), T.CenterCrop(image_size)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
