"""`--augment device`: loader workers decode and draw each view's random parameters; the training device
applies the two views batched (data/ops.py).

The parameters are drawn from the same keyed generator, in the same order and with the same torchvision
algorithms as the reference pipeline (data/augment.py) draws them, so a key gives the same crop box, jitter,
order and coin flips on both paths; only the pixel arithmetic differs (PIL there, float tensors here).
A worker ships the part of the image that holds both crop boxes, as uint8.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from moco_scale.data import ops
from moco_scale.data.augment import FLIP_P, GRAY_P, JITTER, JITTER_P, VIEWS, normalize

_JITTER = T.ColorJitter(*JITTER)
_NO_JITTER = (1.0, 1.0, 1.0, 0.0)


def draw_view(img: Image.Image, crop_min: float, blur_p: float, solarize_p: float,
              sigma: tuple[float, float]) -> dict[str, torch.Tensor]:
    """One view's parameters, consuming torch's generator exactly as data/augment.py's view_transform does."""
    top, left, height, width = T.RandomResizedCrop.get_params(img, scale=(crop_min, 1.0), ratio=(3 / 4, 4 / 3))
    jitter = not JITTER_P < torch.rand(1)  # RandomApply
    if jitter:
        order, *factors = _JITTER.get_params(_JITTER.brightness, _JITTER.contrast, _JITTER.saturation, _JITTER.hue)
    else:
        order, factors = torch.arange(4), _NO_JITTER
    gray = bool(torch.rand(1) < GRAY_P)
    blur = not blur_p < torch.rand(1)
    s = torch.empty(1).uniform_(*sigma).item() if blur else 0.0
    solar = bool(torch.rand(1).item() < solarize_p)
    flip = bool(torch.rand(1) < FLIP_P)
    return {"box": torch.tensor([top, left, height, width]), "jitter": torch.tensor(jitter),
            "factors": torch.tensor(factors, dtype=torch.float64), "order": order,
            "gray": torch.tensor(gray), "sigma": torch.tensor(s, dtype=torch.float64),
            "solarize": torch.tensor(solar), "flip": torch.tensor(flip)}


@dataclass(frozen=True)
class DeviceViews:
    """The worker's part: decode to uint8, draw both views' parameters, cut the box that holds both crops."""

    crop_min: float
    sigma: tuple[float, float]

    def __call__(self, img: Image.Image) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        views = [draw_view(img, self.crop_min, blur_p, solarize_p, self.sigma) for blur_p, solarize_p in VIEWS]
        box = torch.stack([v["box"] for v in views])
        top, left = box[:, 0].min(), box[:, 1].min()
        bottom, right = (box[:, 0] + box[:, 2]).max(), (box[:, 1] + box[:, 3]).max()
        pixels = torch.from_numpy(np.array(img.crop((int(left), int(top), int(right), int(bottom))))).permute(2, 0, 1)
        box[:, 0] -= top
        box[:, 1] -= left
        params = {k: torch.stack([v[k] for v in views]) for k in views[0]}
        params["box"] = box
        return pixels, params


@dataclass
class DecodedBatch:
    """A collated `--augment device` batch: B uint8 images, each cut to the box holding both of its crops (no
    padding: the resize runs per sample anyway), laid end to end in one buffer `pixels`, each (H_i, W_i, 3)
    at the offsets its `shapes` give (one shared-memory segment, one pinned copy, one host-to-device copy per
    batch, where a tensor per image cost a segment and a copy each); the jitter `factors` (B, 2, 4) and blur
    `sigma` (B, 2), and what the host already knows, so that the device never reads a value back: `index`
    holds, for each view and op, the samples it touches, at the `spans` (start, stop) the host keeps; `boxes`
    are each view's crop boxes (top, left, height, width). The coin flips and the jitter order travel only as
    `index`."""

    pixels: torch.Tensor
    shapes: list[tuple[int, int]]
    factors: torch.Tensor
    sigma: torch.Tensor
    index: torch.Tensor
    spans: list[dict[str, Any]]
    boxes: list[list[tuple[int, int, int, int]]]

    @property
    def images(self) -> list[torch.Tensor]:
        """The images as (3, H_i, W_i) views of `pixels` (channels last in memory, as the worker cut them)."""
        ends = self._ends()
        return [self.pixels[end - 3 * h * w:end].view(h, w, 3).permute(2, 0, 1)
                for end, (h, w) in zip(ends, self.shapes, strict=True)]

    def _ends(self) -> list[int]:
        return list(itertools.accumulate(3 * h * w for h, w in self.shapes))

    def tensors(self) -> list[torch.Tensor]:
        """What crosses to the device."""
        return [self.pixels, self.factors, self.sigma, self.index]

    def pin_memory(self) -> DecodedBatch:  # called by the DataLoader's pin-memory thread
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device, non_blocking: bool = False) -> DecodedBatch:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def _map(self, fn) -> DecodedBatch:
        return DecodedBatch(fn(self.pixels), self.shapes, fn(self.factors), fn(self.sigma), fn(self.index),
                            self.spans, self.boxes)

    def __len__(self) -> int:
        return len(self.shapes)

    def split(self, size: int) -> list[DecodedBatch]:
        """Sub-batches of `size` samples with their own op groups. It reads `index`: for a batch on the host."""
        ends = [0, *self._ends()]
        out = []
        for lo in range(0, len(self), size):
            hi = min(lo + size, len(self))
            groups = _Groups()

            def cut(span: tuple[int, int], lo: int = lo, hi: int = hi, groups: _Groups = groups) -> tuple[int, int]:
                samples = self.index[span[0]:span[1]]
                return groups.span(samples[(samples >= lo) & (samples < hi)] - lo)

            spans = [_map_spans(view, cut) for view in self.spans]
            out.append(DecodedBatch(self.pixels[ends[lo]:ends[hi]], self.shapes[lo:hi], self.factors[lo:hi],
                                    self.sigma[lo:hi], groups.index(), spans, [boxes[lo:hi] for boxes in self.boxes]))
        return out


class _Groups:
    """The op groups' sample indices laid end to end, each known to the host by its span."""

    def __init__(self) -> None:
        self.parts: list[torch.Tensor] = []
        self.length = 0

    def span(self, samples: torch.Tensor) -> tuple[int, int]:
        self.parts.append(samples)
        self.length += len(samples)
        return self.length - len(samples), self.length

    def index(self) -> torch.Tensor:
        return torch.cat(self.parts)


def _map_spans(node: Any, fn) -> Any:
    """`fn` applied to every (start, stop) span of a view's nested span layout."""
    if isinstance(node, dict):
        return {k: _map_spans(v, fn) for k, v in node.items()}
    if isinstance(node, list):
        return [_map_spans(v, fn) for v in node]
    return fn(node)


class Collate:
    """Lays the images end to end in one buffer, stacks the parameters and lays out the op groups."""

    def __call__(self, samples: list[tuple[torch.Tensor, dict[str, torch.Tensor]]]) -> DecodedBatch:
        images = [pixels.permute(1, 2, 0) for pixels, _ in samples]  # (H, W, 3): the worker's memory order
        pixels = torch.cat([image.reshape(-1) for image in images])
        shapes = [(image.shape[0], image.shape[1]) for image in images]
        p = {k: torch.stack([s[1][k] for s in samples]) for k in samples[0][1]}
        groups = _Groups()

        def span(mask: torch.Tensor) -> tuple[int, int]:
            return groups.span(mask.nonzero().flatten())

        spans = []
        for v in range(2):
            on = p["jitter"][:, v]
            spans.append({"jitter": [[span(on & (p["order"][:, v, k] == op)) for op in range(4)] for k in range(4)],
                          "gray": span(p["gray"][:, v]), "blur": span(p["sigma"][:, v] > 0),
                          "solarize": span(p["solarize"][:, v]), "flip": span(p["flip"][:, v])})
        boxes = [[tuple(b) for b in p["box"][:, v].tolist()] for v in range(2)]
        return DecodedBatch(pixels, shapes, p["factors"], p["sigma"], groups.index(), spans, boxes)


CPU_CHUNK = 8  # samples per pass on a CPU device: a view's float chunk (4.8 MB at 224 px) stays in its cache


class AugmentOnDevice:
    """The device's part: both views of a DecodedBatch, batched, normalised; nothing read back to the host.

    On a CPU device the batch goes through in chunks of CPU_CHUNK samples: the ops are elementwise or per
    sample, so a whole-batch pass would stream every intermediate through memory (measured: up to 2x slower
    per op at batch 64). A sample's pixels do not depend on the chunking (its ops see only its own values)."""

    def __init__(self, size: int, sigma: tuple[float, float]) -> None:
        self.size = size
        self.kernel = 2 * math.ceil(3 * sigma[1]) + 1  # +-3 sigma at the largest sigma, as far as PIL's blur reaches

    def __call__(self, batch: DecodedBatch) -> tuple[torch.Tensor, torch.Tensor]:
        device = batch.pixels.device
        out = torch.empty(2, len(batch), 3, self.size, self.size, device=device)
        if device.type == "cpu" and len(batch) > CPU_CHUNK:
            for lo, chunk in zip(range(0, len(batch), CPU_CHUNK), batch.split(CPU_CHUNK), strict=True):
                self._views(chunk, out[:, lo:lo + len(chunk)])
        else:
            self._views(batch, out)
        return out[0], out[1]

    def _views(self, batch: DecodedBatch, out: torch.Tensor) -> None:
        """Both views of `batch`, normalised into out (2, B, 3, size, size)."""
        images = batch.images
        for v, spans in enumerate(batch.spans):
            x = ops.resized_crop(images, batch.boxes[v], self.size)
            for position in spans["jitter"]:
                for op, span in enumerate(position):
                    x = _apply(x, batch.index, span, ops.JITTER_OPS[op], batch.factors[:, v, op])
            x = _apply(x, batch.index, spans["gray"], ops.to_grayscale)
            x = _apply(x, batch.index, spans["blur"], ops.gaussian_blur, batch.sigma[:, v], self.kernel)
            x = _apply(x, batch.index, spans["solarize"], ops.solarize)
            x = _apply(x, batch.index, spans["flip"], ops.hflip)
            normalize(x, scaled=True, out=out[v])


def _apply(x: torch.Tensor, index: torch.Tensor, span: tuple[int, int], op, *args) -> torch.Tensor:
    """x (a batch this module owns) with op applied in place to the samples index[start:stop]; per-sample
    tensor arguments are indexed alike."""
    if span[0] == span[1]:
        return x
    if span[1] - span[0] == len(x):  # every sample (the group holds distinct indices)
        return op(x, *args)
    idx = index[span[0]:span[1]]
    picked = [a.index_select(0, idx) if isinstance(a, torch.Tensor) else a for a in args]
    return x.index_copy_(0, idx, op(x.index_select(0, idx), *picked))
