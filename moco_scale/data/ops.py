"""Batched image ops with per-sample parameters, for `--augment device`: pure functions of float images
(B, 3, H, W) in [0, 1] on any device, each matching torchvision's tensor functional (transforms.v2.functional)
applied image by image with the same parameter.

Sums over filter taps are written out tap by tap, never as a reduction or a matmul over a padded size: a
sample's pixels then do not depend on which other samples share its batch (the world size and the loader's
batch split change that), only on its own parameters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale (ITU-R 601-2)


def aa_taps(start: torch.Tensor, length: torch.Tensor, out_size: int, taps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Source indices and weights (B, out_size, taps) of an antialiased bilinear resize of the segment
    [start, start + length) of each sample to `out_size`: torch's `interpolate(..., mode="bilinear",
    antialias=True)` filter (a triangle widened by the downscale factor, clipped to the segment and
    renormalised). Taps beyond a pixel's support get weight 0 and a valid index."""
    scale = length.double() / out_size  # (B,)
    support = torch.where(scale >= 1, scale, torch.ones_like(scale))
    inv = torch.where(scale >= 1, 1 / scale, torch.ones_like(scale))
    center = scale[:, None] * (torch.arange(out_size, device=start.device, dtype=torch.float64) + 0.5)  # (B, out)
    lo = (center - support[:, None] + 0.5).trunc().clamp(min=0)
    hi = torch.minimum((center + support[:, None] + 0.5).trunc(), length[:, None].double())
    j = lo[..., None] + torch.arange(taps, device=start.device, dtype=torch.float64)  # (B, out, taps)
    w = (1 - ((j - center[..., None] + 0.5) * inv[:, None, None]).abs()).clamp(min=0)
    w = torch.where(j < hi[..., None], w, torch.zeros_like(w))
    total = w[..., 0].clone()
    for t in range(1, taps):
        total += w[..., t]
    w = (w / total[..., None]).float()
    idx = torch.minimum(j, (length[:, None, None] - 1).double()).long() + start[:, None, None]
    return idx, w


def _resample(x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, dim: int) -> torch.Tensor:
    """Sum over taps of w * x gathered along `dim` (2: rows, 3: columns); idx, w are (B, out, taps)."""
    b, c, h, wd = x.shape
    out = None
    for t in range(idx.shape[-1]):
        if dim == 2:
            index, weight = idx[:, None, :, t, None].expand(b, c, -1, wd), w[:, None, :, t, None]
        else:
            index, weight = idx[:, None, None, :, t].expand(b, c, h, -1), w[:, None, None, :, t]
        term = x.gather(dim, index).float() * weight
        out = term if out is None else out.add_(term)
    return out


def resized_crop(images: torch.Tensor, box: torch.Tensor, size: int, taps: int) -> torch.Tensor:
    """Crop box (top, left, height, width) of each uint8 image (B, 3, H, W) resized to size x size: torchvision's
    `resized_crop(..., antialias=True)` on the float image, as float in [0, 1]. `taps`: at least
    `max_taps(box, size)` (from the host, so that no value is read back from the device)."""
    top, left, height, width = box.unbind(-1)
    idx, w = aa_taps(left, width, size, taps)
    x = _resample(images, idx, w, dim=3)  # columns first, as torch does
    idx, w = aa_taps(top, height, size, taps)
    return _resample(x, idx, w, dim=2).div_(255)


def max_taps(box: torch.Tensor, size: int) -> int:
    """Taps that cover the widest filter of any crop in `box` (..., 4) resized to `size` (host tensors)."""
    longest = float(box[..., 2:].max()) / size
    return int(2 * max(longest, 1.0)) + 2


def grayscale(x: torch.Tensor) -> torch.Tensor:
    """Luma (B, 1, H, W) with torchvision's weights."""
    r, g, b = x.unbind(1)
    return (r * GRAY_WEIGHTS[0] + g * GRAY_WEIGHTS[1] + b * GRAY_WEIGHTS[2]).unsqueeze(1)


def to_grayscale(x: torch.Tensor) -> torch.Tensor:
    """RandomGrayscale's output: the luma in all three channels."""
    return grayscale(x).expand_as(x)


def _per_sample(v: torch.Tensor) -> torch.Tensor:
    return v.to(torch.float32).view(-1, 1, 1, 1)


def blend(x: torch.Tensor, other: torch.Tensor | float, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, clamped to [0, 1] (torchvision's _blend)."""
    f = _per_sample(factor)
    return (x * f + other * (1 - f)).clamp_(0, 1)


def adjust_brightness(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, 0.0, factor)


def adjust_contrast(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x).mean(dim=(-2, -1), keepdim=True), factor)


def adjust_saturation(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return blend(x, grayscale(x), factor)


def adjust_hue(x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by `factor` turns; value (max) and chroma (max - min) are kept."""
    r, g, b = x.unbind(1)
    value, _ = x.max(dim=1)
    chroma = value - x.min(dim=1).values
    safe = torch.where(chroma > 0, chroma, torch.ones_like(chroma))
    # hue in sextants [0, 6): the channel holding the maximum decides (red first, then green, as torchvision)
    hue = torch.where(value == r, ((g - b) / safe) % 6,
                      torch.where(value == g, (b - r) / safe + 2, (r - g) / safe + 4))
    hue = torch.where(chroma > 0, hue, torch.zeros_like(hue))
    hue = (hue / 6 + _per_sample(factor).squeeze(1)) % 1 * 6
    out = []
    for n in (5, 3, 1):  # red, green, blue: value - chroma * clamp(min(k, 4 - k), 0, 1), k = (n + hue) mod 6
        k = (hue + n) % 6
        out.append(value - chroma * torch.minimum(k, 4 - k).clamp_(0, 1))
    return torch.stack(out, dim=1).clamp_(0, 1)


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
    w, pad = gaussian_kernels(sigma, size), size // 2
    h, wd = x.shape[-2:]
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    rows = None
    for t in range(size):
        term = xp[..., t:t + wd] * w[:, t, None, None, None]
        rows = term if rows is None else rows.add_(term)
    out = None
    for t in range(size):
        term = rows[..., t:t + h, :] * w[:, t, None, None, None]
        out = term if out is None else out.add_(term)
    return out


def solarize(x: torch.Tensor, threshold: float = 128 / 255) -> torch.Tensor:
    return torch.where(x >= threshold, 1 - x, x)


def hflip(x: torch.Tensor) -> torch.Tensor:
    return x.flip(-1)
