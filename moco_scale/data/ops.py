"""Batched image ops with per-sample parameters, for `--augment device`: pure functions of float images
(B, 3, H, W) in [0, 1] on any device, each matching torchvision's tensor functional (transforms.v2.functional)
applied image by image with the same parameter.

A sample's pixels depend only on its own image and parameters, never on which other samples share its batch
(the world size and the loader's batch split change that): the resize runs per sample, and the blur's sum over
its taps is written out tap by tap rather than left to a convolution whose algorithm may follow the batch size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from moco_scale.data.augment import SOLARIZE_AT

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)


def resized_crop(images: Sequence[torch.Tensor], boxes: Sequence[tuple[int, int, int, int]], size: int,
                 uint8_kernel: bool | None = None) -> torch.Tensor:
    """Crop box (top, left, height, width) of each uint8 image (3, H_i, W_i) resized to size x size, as float in
    [0, 1]: the uint8 values torchvision's `resized_crop(..., antialias=True)` gives on the uint8 image. On a CPU
    that is torch's uint8 kernel (the one torchvision runs there; 4x faster than the float one, and uint8 like the
    reference's PIL resize), elsewhere the float kernel, rounded (as torchvision does there). One resize per
    sample (every crop has its own size; the antialiased kernel touches only the crop), the boxes read on the
    host."""
    device = images[0].device
    if uint8_kernel is None:
        uint8_kernel = device.type == "cpu"
    out = torch.empty(len(boxes), 3, size, size, device=device, dtype=torch.uint8 if uint8_kernel else torch.float32)
    for b, (top, left, height, width) in enumerate(boxes):
        crop = images[b][None, :, top:top + height, left:left + width]
        out[b:b + 1] = F.interpolate(crop if uint8_kernel else crop.float(), size=(size, size), mode="bilinear",
                                     antialias=True, align_corners=False)
    return out.float().div_(255) if uint8_kernel else out.round_().clamp_(0, 255).div_(255)


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0]).add_(g, alpha=GRAY_WEIGHTS[1]).add_(b, alpha=GRAY_WEIGHTS[2]).unsqueeze(1)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's output: the luma in all three channels."""
    return grayscale(x).expand_as(x)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    f = _per_sample(factor)
    if isinstance(other, float) and other == 0.0:
        return x.mul(f).clamp_(0, 1)
    return x.mul(f).add_(other * (1 - f)).clamp_(0, 1)  # the same three roundings, two fewer passes


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x).mean(dim=(-2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `factor` turns (|factor| <= 0.5); value (max) and chroma (max - min) are kept.

    Written for few passes over memory (a CPU device runs it on the training cores): one `%`, no `where`.
    The hue in sextants is (g - b) / c where red holds the maximum, (b - r) / c + 2 where green does, and
    (r - g) / c + 4 where blue does (the formulas agree where two channels tie). Each output channel is
    value - chroma * clamp(2 - d, 0, 1), d the rotated hue's distance around the circle of 6 from the channel's
    complement (cyan 3 for red, magenta 5 for green, yellow 1 for blue)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    chroma = value - x.amin(1)
    is_r = (value == r).float()
    is_g = (value == g).float().mul_(1 - is_r)
    hue = (g - b).mul_(is_r)
    hue.addcmul_((b - r).add_(chroma, alpha=2), is_g)
    hue.addcmul_((r - g).add_(chroma, alpha=4), is_r.add_(is_g).neg_().add_(1))  # blue: neither red nor green
    hue.div_(chroma.clamp(min=1e-12)).add_(_per_sample(factor).squeeze(1), alpha=6).remainder_(6)
    base = value.sub_(chroma, alpha=2)  # value - chroma * (2 - clamp(d, 1, 2))
    out = torch.empty_like(x)
    for c, shift in enumerate((0, -2, -4)):  # red, green, blue: d = ||hue + shift| - 3|, hue + shift in [-4, 6)
        d = hue.add(shift).abs_().sub_(3).abs_().clamp_(1, 2)
        torch.addcmul(base, chroma, d, out=out[:, c])
    return out.clamp_(0, 1)


JITTER_OPS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)  # torchvision's fn_idx order


def gaussian_kernels(sigma: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) normalised Gaussian weights over offsets -size//2..size//2; sigma 0 gives the identity."""
    d = torch.arange(size, device=sigma.device, dtype=torch.float32) - size // 2
    s = sigma.float().clamp(min=1e-6)[:, None]
    w = torch.exp(-(d / s) ** 2 / 2)
    w = w / w.sum(dim=1, keepdim=True)
    delta = (d == 0).float().expand_as(w)
    return torch.where(sigma[:, None] > 0, w, delta)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, size: int) -> torch.Tensor:
    """torchvision's `gaussian_blur(kernel_size=size, sigma)` per sample: separable, reflect padding."""
    w, pad = gaussian_kernels(sigma, size)[:, :, None, None, None], size // 2
    h, wd = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = xp[..., 0:wd] * w[:, 0]
    for t in range(1, size):
        rows.addcmul_(xp[..., t:t + wd], w[:, t])
    out = rows[..., 0:h, :] * w[:, 0]
    for t in range(1, size):
        out.addcmul_(rows[..., t:t + h, :], w[:, t])
    return out


def solarize(x: torch.Tensor, threshold: float = SOLARIZE_AT / 255) -> torch.Tensor:
    return torch.where(x >= threshold, 1 - x, x)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)
