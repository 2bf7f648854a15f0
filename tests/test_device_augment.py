"""`--augment device` against torchvision, op by op and view by view; its parameter draws against the reference
pipeline's; the uint8 reference path against the old float one; both paths independent of world size and
loader workers. On real JPEGs (data/photos.py) and the built-in digits."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms as T
from torchvision.transforms.v2 import functional as TF

from moco_scale.data import (
    GlobalBatchSampler,
    image_folder,
    keyed_rng,
    normalize,
    ops,
    pretrain_dataset,
    two_view_transforms,
)
from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD, VIEWS
from moco_scale.data.device_views import AugmentOnDevice, Collate, DeviceViews, draw_view
from moco_scale.data.photos import write_photo_folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """24 JPEGs, some grayscale and CMYK, decoded to RGB as the loader does."""
    root = write_photo_folder(tmp_path_factory.mktemp("photos"), 24)
    folder = image_folder(str(root / "train"))
    return root, [folder[i][0] for i in range(len(folder))]


def _float_batch(images: list[Image.Image], size: int = 96) -> torch.Tensor:
    """Float [0, 1] crops of the photos, as the resize leaves them."""
    return torch.stack([TF.resize(TF.pil_to_tensor(im), [size, size], antialias=True) for im in images]).float() / 255


def test_photos_are_imagenet_like(photos):
    root, images = photos
    modes = {Image.open(p).mode for p in sorted((root / "train").rglob("*.jpg"))}
    assert modes == {"RGB", "L", "CMYK"}
    sizes = [im.size for im in images]
    assert sum(s == (500, 375) for s in sizes) >= len(sizes) // 2
    assert all(400 <= max(s) <= 640 and 0.55 < s[0] / s[1] < 1.8 for s in sizes)
    assert all(im.mode == "RGB" for im in images)


def test_cpu_path_is_the_reference_pipeline_bit_for_bit_after_normalisation(photos):
    """uint8 out of the loader + normalize on the device == ToTensor + Normalize in the worker."""
    for image, size, crop_min in ((photos[1][0], 224, 0.08), (photos[1][3], 64, 0.2)):
        new = two_view_transforms(size, crop_min)
        old = [T.Compose([*v.transforms[:-1], T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]) for v in new]
        for key in range(4):
            for v in range(2):
                with keyed_rng(0, 0, key):
                    got = new[v](image)
                with keyed_rng(0, 0, key):
                    want = old[v](image)
                assert got.dtype == torch.uint8
                assert torch.equal(normalize(got), want)


def test_resized_crop_is_torchvisions_antialiased_resize(photos):
    """uint8 kernel (a CPU device's): torchvision's uint8 tensor path bit for bit; float kernel (other devices):
    torchvision's float path rounded to uint8 values."""
    images = [TF.pil_to_tensor(im) for im in photos[1][:6]]
    h, w = min(i.shape[1] for i in images), min(i.shape[2] for i in images)
    batch = [i[:, :h, :w] for i in images[:3]] + [i.permute(1, 2, 0).contiguous().permute(2, 0, 1) for i in images[3:]]
    boxes = torch.tensor([[0, 0, h, w], [10, 20, 50, 60], [100, 50, 200, 100], [5, 5, h - 10, 150], [0, 0, 20, 20],
                          [30, 40, 224, 224]])
    assert torch.equal(ops.resized_crop(batch, boxes.tolist(), 32), ops.resized_crop(batch, boxes.tolist(), 32, True))
    for size in (224, 32):
        got8 = ops.resized_crop(batch, boxes.tolist(), size, uint8_kernel=True) * 255
        got = ops.resized_crop(batch, boxes.tolist(), size, uint8_kernel=False) * 255
        for b, (t, left, bh, bw) in enumerate(boxes.tolist()):
            want8 = TF.resized_crop(batch[b], t, left, bh, bw, [size, size], antialias=True)
            assert (got8[b] - want8.float()).abs().max() < 1e-3
            want = TF.resized_crop(batch[b].float(), t, left, bh, bw, [size, size], antialias=True)
            assert (got[b] - want).abs().max() < 0.5 + 1e-3
            assert (got[b] - got[b].round()).abs().max() < 1e-3  # uint8 values


@pytest.mark.parametrize("name,op,reference,lo,hi,bound", [
    ("brightness", ops.adjust_brightness, TF.adjust_brightness, 0.6, 1.4, 1e-6),
    ("contrast", ops.adjust_contrast, TF.adjust_contrast, 0.6, 1.4, 1e-6),
    ("saturation", ops.adjust_saturation, TF.adjust_saturation, 0.8, 1.2, 1e-6),
    ("hue", ops.adjust_hue, TF.adjust_hue, -0.1, 0.1, 1e-5),  # value - chroma * ... against a trip through HSV
    ("hue, whole range", ops.adjust_hue, TF.adjust_hue, -0.5, 0.5, 1e-5),
    ("blur", lambda x, s: ops.gaussian_blur(x, s, 13), lambda x, s: TF.gaussian_blur(x, [13, 13], [s, s]), 0.1,
     2.0, 1e-5),
])
def test_jitter_and_blur_match_torchvision_per_sample(photos, name, op, reference, lo, hi, bound):
    x = _float_batch(photos[1][:8])
    x[0] = x[0].mean(0, keepdim=True)  # a gray image: zero chroma, zero saturation
    factors = torch.linspace(lo, hi, len(x))
    got = op(x, factors)
    for b in range(len(x)):
        assert (got[b] - reference(x[b], float(factors[b]))).abs().max() < bound, (name, b)


def test_grayscale_solarize_flip_and_the_identity_blur_match_torchvision(photos):
    x = _float_batch(photos[1][:4])
    assert (ops.to_grayscale(x) - TF.rgb_to_grayscale(x, 3)).abs().max() < 1e-6
    assert torch.equal(ops.solarize(x), TF.solarize(x, 128 / 255))
    assert torch.equal(ops.hflip(x), TF.horizontal_flip(x))
    assert torch.equal(ops.gaussian_blur(x, torch.zeros(len(x)), 13), x)  # sigma 0: the view is not blurred


def _torchvision_view(image: Image.Image, p: dict[str, torch.Tensor], size: int, kernel: int) -> torch.Tensor:
    """One view made image by image with torchvision's tensor functional and the drawn parameters."""
    t, left, h, w = p["box"].tolist()
    x = TF.resized_crop(TF.pil_to_tensor(image), t, left, h, w, [size, size], antialias=True).float() / 255
    if p["jitter"]:
        fns = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
        for op in p["order"].tolist():
            x = fns[op](x, float(p["factors"][op]))
    if p["gray"]:
        x = TF.rgb_to_grayscale(x, 3)
    if p["sigma"] > 0:
        x = TF.gaussian_blur(x, [kernel, kernel], [float(p["sigma"])] * 2)
    if p["solarize"]:
        x = TF.solarize(x, 128 / 255)
    if p["flip"]:
        x = TF.horizontal_flip(x)
    return normalize(x, scaled=True)


def test_whole_views_match_torchvision_within_2_of_255(photos):
    """Both views of 24 photos, batched on the device, against torchvision image by image, in [0, 1] pixel units."""
    images, size, sigma = photos[1], 96, (0.1, 2.0)
    worker, device = DeviceViews(0.08, sigma), AugmentOnDevice(size, sigma)
    samples = []
    for i, image in enumerate(images):
        with keyed_rng(0, 0, i):
            samples.append(worker(image))
    x1, x2 = device(Collate()(samples))
    worst = 0.0
    for i, image in enumerate(images):
        with keyed_rng(0, 0, i):  # the same draws, on the whole image
            params = [draw_view(image, 0.08, bp, sp, sigma) for bp, sp in VIEWS]
        for got, p in zip((x1[i], x2[i]), params, strict=True):
            diff = (got - _torchvision_view(image, p, size, device.kernel)) * torch.tensor(IMAGENET_STD)[:, None, None]
            worst = max(worst, float(diff.abs().max()))
    assert worst < 1e-4, worst  # measured 9.7e-7 (CPU: the resize is torchvision's own uint8 kernel); issue: 2/255


def test_parameter_draws_consume_the_generator_as_the_reference_pipeline(photos):
    """Same key -> the same crop box and the same generator state after both views as the PIL pipeline, over
    keys where the jitter, the blur and the solarize coin land either way."""
    image = photos[1][1]
    cpu, worker = two_view_transforms(224, 0.08), DeviceViews(0.08, (0.1, 2.0))
    outcomes = set()
    for key in range(60):
        with keyed_rng(5, 1, key):
            cpu[0](image), cpu[1](image)
            after_cpu = torch.rand(2)
        with keyed_rng(5, 1, key):
            box = T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
        with keyed_rng(5, 1, key):
            pixels, p = worker(image)
            after = torch.rand(2)
        assert torch.equal(after, after_cpu), key
        offset = (p["box"][0, :2] - torch.tensor(box[:2]))  # the worker cut the box holding both crops
        assert torch.equal(p["box"][0, 2:], torch.tensor(box[2:])) and (offset <= 0).all()
        assert pixels.shape[1] >= int((p["box"][:, 0] + p["box"][:, 2]).max())
        outcomes.add((bool(p["jitter"][1]), bool(p["sigma"][1] > 0), bool(p["solarize"][1])))
    assert len(outcomes) >= 4


def test_parameter_statistics_over_10000_draws():
    """Probabilities, ranges and the jitter order over 10,000 keyed draws of both views. Bounds: 5 standard
    errors of each mean (a false failure about once in 3 million runs per check)."""
    image = Image.new("RGB", (500, 375))
    n, sigma = 10_000, (0.1, 2.0)
    draws = []
    for key in range(n):
        with keyed_rng(0, 0, key):
            draws.append([draw_view(image, 0.08, bp, sp, sigma) for bp, sp in VIEWS])

    def rate(v: int, name: str, p: float, fn=bool) -> None:
        got = np.mean([fn(d[v][name]) for d in draws])
        assert abs(got - p) < 5 * math.sqrt(p * (1 - p) / n) + 1e-12, (v, name, got, p)

    for v, (blur_p, solarize_p) in enumerate(VIEWS):
        rate(v, "jitter", 0.8)
        rate(v, "gray", 0.2)
        rate(v, "flip", 0.5)
        rate(v, "solarize", solarize_p)
        rate(v, "sigma", blur_p, fn=lambda s: s > 0)
        boxes = torch.stack([d[v]["box"] for d in draws]).double()
        area = boxes[:, 2] * boxes[:, 3] / (500 * 375)
        assert area.min() > 0.08 * 0.95 and area.max() <= 1
        log_ratio = (boxes[:, 3] / boxes[:, 2]).log()
        assert log_ratio.min() > math.log(3 / 4) - 0.02 and log_ratio.max() < math.log(4 / 3) + 0.02
        assert ((boxes[:, 0] >= 0) & (boxes[:, 0] + boxes[:, 2] <= 375) & (boxes[:, 1] + boxes[:, 3] <= 500)).all()
        jit = [d[v] for d in draws if d[v]["jitter"]]
        f = torch.stack([d["factors"] for d in jit])
        for op, (lo, hi) in enumerate(((0.6, 1.4), (0.6, 1.4), (0.8, 1.2), (-0.1, 0.1))):
            assert f[:, op].min() >= lo and f[:, op].max() <= hi
            sd = (hi - lo) / math.sqrt(12)
            assert abs(f[:, op].mean() - (lo + hi) / 2) < 5 * sd / math.sqrt(len(jit))
        first = torch.stack([d["order"][0] for d in jit])
        for op in range(4):
            got = float((first == op).double().mean())
            assert abs(got - 0.25) < 5 * math.sqrt(0.25 * 0.75 / len(jit)), (op, got)
        s = torch.tensor([float(d[v]["sigma"]) for d in draws if d[v]["sigma"] > 0])
        assert s.min() >= 0.1 and s.max() <= 2.0
        assert abs(s.mean() - 1.05) < 5 * (1.9 / math.sqrt(12)) / math.sqrt(len(s))
    a1 = torch.tensor([float(d[0]["box"][2] * d[0]["box"][3]) for d in draws])
    a2 = torch.tensor([float(d[1]["box"][2] * d[1]["box"][3]) for d in draws])
    assert abs(float(torch.corrcoef(torch.stack([a1, a2]))[0, 1])) < 5 / math.sqrt(n)  # the views draw apart


@pytest.mark.parametrize("augment", ["cpu", "device"])
def test_same_pixels_whatever_the_world_size_and_workers(photos, augment):
    """A global batch of 16 at world 1, workers 0 == its two rank halves, workers 2, concatenated (on the CPU
    device the whole batch goes through in chunks, the halves in one pass each)."""
    root = photos[0]
    ds = pretrain_dataset(str(root), 64, 0.08, seed=3, augment=augment)

    def views(world: int, rank: int, workers: int):
        loader = DataLoader(ds, batch_sampler=GlobalBatchSampler(len(ds), 16, world, rank, seed=3),
                            num_workers=workers, collate_fn=ds.collate)
        return ds.on_device(next(iter(loader)))

    whole = views(1, 0, 0)
    halves = [views(2, r, 2) for r in range(2)]
    for v in range(2):
        assert torch.equal(torch.cat([h[v] for h in halves]), whole[v])
    assert not torch.equal(whole[0], whole[1])


def test_a_batch_crosses_as_one_buffer_that_holds_each_image_and_splits_into_its_samples(photos):
    """Collate lays the worker's images end to end in one uint8 buffer: each image is a view of it equal to what
    the worker cut, and a split's sub-batches hold the same images, their own slices of that buffer."""
    worker, samples = DeviceViews(0.08, (0.1, 2.0)), []
    for i, image in enumerate(photos[1][:11]):
        with keyed_rng(0, 0, i):
            samples.append(worker(image))
    batch = Collate()(samples)
    assert len(batch.tensors()) == 4  # pixels, factors, sigma, index: not one tensor per image
    assert batch.pixels.numel() == sum(pixels.numel() for pixels, _ in samples)
    for got, (pixels, _) in zip(batch.images, samples, strict=True):
        assert torch.equal(got, pixels)
        assert got.untyped_storage().data_ptr() == batch.pixels.untyped_storage().data_ptr()
    parts = batch.split(4)
    assert [len(part) for part in parts] == [4, 4, 3]
    for got, (pixels, _) in zip([image for part in parts for image in part.images], samples, strict=True):
        assert torch.equal(got, pixels)
