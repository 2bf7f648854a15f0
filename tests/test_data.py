"""Data: keyed augmentation, world-size-invariant batches, the two views, and bad-input errors."""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from moco_scale.data import (
    DataError,
    GlobalBatchSampler,
    KeyedTwoViews,
    keyed_rng,
    load_digits_split,
    normalize,
    pretrain_dataset,
    two_view_transforms,
)


@pytest.mark.parametrize("world", [2, 4])
def test_rank_batches_concatenate_to_the_single_process_batch(world):
    one = list(GlobalBatchSampler(103, 16, 1, 0, seed=3))
    for epoch in (0, 1):
        samplers = [GlobalBatchSampler(103, 16, world, r, seed=3) for r in range(world)]
        for s in samplers:
            s.set_epoch(epoch)
        single = GlobalBatchSampler(103, 16, 1, 0, seed=3)
        single.set_epoch(epoch)
        for batches, whole in zip(zip(*samplers, strict=True), single, strict=True):
            assert [k for b in batches for k in b] == whole
    assert len(one) == 103 // 16  # drop_last
    flat = [i for b in one for _, i in b]
    assert len(set(flat)) == len(flat)
    assert one != list(GlobalBatchSampler(103, 16, 1, 0, seed=4))  # the seed shuffles


def test_sampler_refuses_uneven_split():
    with pytest.raises(ValueError, match="does not divide by world size 3"):
        GlobalBatchSampler(100, 16, 3, 0)


def test_same_pixels_whatever_the_workers_and_ranks():
    ds = pretrain_dataset(None, 32, 0.2, seed=7)
    whole = GlobalBatchSampler(len(ds), 8, 1, 0, seed=7)
    ref = next(iter(DataLoader(ds, batch_sampler=whole, num_workers=0)))
    halves = [next(iter(DataLoader(ds, batch_sampler=GlobalBatchSampler(len(ds), 8, 2, r, seed=7), num_workers=2)))
              for r in range(2)]
    for v in range(2):
        assert torch.equal(torch.cat([h[v] for h in halves]), ref[v])
    assert not torch.equal(ref[0], ref[1])  # the two views differ


def test_keyed_rng_is_deterministic_and_restores_the_global_state():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    with keyed_rng(1, 2, 3):
        a = torch.rand(4)
    with keyed_rng(1, 2, 3):
        b = torch.rand(4)
    with keyed_rng(1, 2, 4):
        c = torch.rand(4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(torch.rand(3), before)


def _count(view, img, n: int, predicate) -> int:
    hits = 0
    for i in range(n):
        with keyed_rng(0, 0, i):
            hits += bool(predicate(normalize(view(img))))
    return hits


def test_view_1_always_blurs_view_2_sometimes():
    # 1-px stripes: a blur of sigma 3 flattens them; colour jitter alone keeps them far apart
    stripes = Image.fromarray(((torch.arange(32) % 2) * 100).repeat(32, 1).to(torch.uint8).numpy()).convert("RGB")
    v1, v2 = two_view_transforms(32, crop_min=1.0, blur_sigma=(3.0, 3.0))
    flat = lambda x: (x[:, :, 1:] - x[:, :, :-1]).abs().mean() < 0.1
    assert _count(v1, stripes, 100, flat) == 100
    assert 2 <= _count(v2, stripes, 300, flat) <= 60  # p = 0.1 -> ~30


def test_view_2_solarizes_sometimes_view_1_never():
    white = Image.new("RGB", (32, 32), (255, 255, 255))
    v1, v2 = two_view_transforms(32, crop_min=0.5)
    # unsolarized white stays >= 153 after brightness jitter (0.6x); solarized it drops to <= 102
    dark = lambda x: x.mean() < -0.2  # normalised: 128/255 ~ 0.0 in ImageNet units is about 0.1
    assert _count(v1, white, 300, dark) == 0
    assert 30 <= _count(v2, white, 300, dark) <= 95  # p = 0.2 -> ~60


def test_builtin_digits_split():
    train, val = load_digits_split("train"), load_digits_split("val")
    assert len(train) + len(val) == 1797 and len(val) == 360
    assert train[0][0].size == (32, 32) and train[0][0].mode == "RGB"
    assert sorted({y for _, y in val}) == list(range(10))


def _folder(tmp_path, corrupt: bool = False, empty_class: bool = False):
    root = tmp_path / "data"
    for c in ("a", "b"):
        (root / "train" / c).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (40, 40), (i * 40, 100, 200)).save(root / "train" / c / f"{i}.png")
    if corrupt:
        (root / "train" / "b" / "9_broken.png").write_bytes(b"this is not a png")
    if empty_class:
        (root / "train" / "c_empty").mkdir()
    return root


def test_missing_folders_are_named(tmp_path):
    with pytest.raises(DataError, match=f"data folder {tmp_path / 'nope'} does not exist"):
        pretrain_dataset(str(tmp_path / "nope"), 32, 0.2, 0)
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has no train/ folder"):
        pretrain_dataset(str(tmp_path / "flat"), 32, 0.2, 0)


def test_empty_class_is_named(tmp_path):
    root = _folder(tmp_path, empty_class=True)
    with pytest.raises(DataError, match="class folder .*c_empty holds no images"):
        pretrain_dataset(str(root), 32, 0.2, 0)
    with pytest.warns(UserWarning, match="skipping empty class folder"):
        assert len(pretrain_dataset(str(root), 32, 0.2, 0, skip_bad=True)) == 6


def test_corrupt_image_error_names_the_file_or_is_skipped_and_counted(tmp_path):
    root = _folder(tmp_path, corrupt=True)
    ds = pretrain_dataset(str(root), 32, 0.2, 0)
    bad = next(i for i, (p, _) in enumerate(ds.base.samples) if "broken" in p)
    with pytest.raises(DataError, match="cannot read image .*9_broken.png"):
        ds[(0, bad)]
    skipping = pretrain_dataset(str(root), 32, 0.2, 0, skip_bad=True)
    with pytest.warns(UserWarning, match="9_broken.png.*skipped"):
        x1, _ = skipping[(0, bad)]
    assert x1.shape == (3, 32, 32) and skipping.skipped_count() == 1
    assert isinstance(skipping, KeyedTwoViews)
