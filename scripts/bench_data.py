"""Benchmark: the pretraining data loader alone (decode, two augmented views, collate, pinned transfer) on
ImageNet-like JPEGs made here, per worker count, against the images/s a training step consumes.

    python scripts/bench_data.py --workers 1 2                  # this machine
    python scripts/bench_data.py --workers 4 8 14 --device cuda --step-json runs/gpu_check/bench_gpu.json

The JPEGs (quality 90, about 500x375 with varied aspect ratios, a few grayscale) are smooth random fields
with texture, written once into --images (default: a temporary folder). `--step-json` is bench_gpu.py's
--json output: the fastest vit_base row's images/s is what the loader must keep up with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from gpu_common import Table
from PIL import Image

from moco_scale.data import pretrain_dataset, pretrain_loader


def write_jpegs(root: Path, count: int, seed: int = 0) -> Path:
    """An ImageFolder root/train/<class>/*.jpg of `count` ImageNet-sized JPEGs (skipped where already there)."""
    train = root / "train"
    if train.is_dir() and sum(1 for _ in train.rglob("*.jpg")) >= count:
        return root
    rng = np.random.default_rng(seed)
    for i in range(count):
        w, h = (500, 375) if i % 3 else tuple(int(v) for v in rng.integers(300, 640, 2))
        low = rng.random((h // 25 + 2, w // 25 + 2, 3)) * 255  # a smooth field, upsampled, plus texture
        img = np.asarray(Image.fromarray(low.astype(np.uint8)).resize((w, h), Image.BICUBIC), dtype=np.float32)
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        pil = Image.fromarray(img)
        if i % 17 == 0:
            pil = pil.convert("L")
        folder = train / f"c{i % 4}"
        folder.mkdir(parents=True, exist_ok=True)
        pil.save(folder / f"{i:05d}.jpg", quality=90)
    return root


def loader_rate(root: Path, workers: int, batch: int, batches: int, pin: bool) -> float:
    dataset = pretrain_dataset(str(root), 224, 0.08, seed=0)
    loader = pretrain_loader(dataset, batch, 1, 0, 0, workers, pin_memory=pin)
    it = iter(loader)
    next(it)  # workers started, first batch out
    start, seen = time.perf_counter(), 0
    for _ in range(batches):
        try:
            x1, _ = next(it)
        except StopIteration:
            break
        seen += x1.shape[0]
    rate = seen / (time.perf_counter() - start)
    del it, loader
    return rate


def step_demand(path: str | None) -> float | None:
    if not path or not Path(path).exists():
        return None
    rows = [r for r in json.loads(Path(path).read_text()) if r["arch"] == "vit_base"]
    return max((r["img_per_s"] for r in rows), default=None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--images", default=None, help="folder for the generated JPEGs (kept; default: temporary)")
    p.add_argument("--count", type=int, default=512, help="JPEGs to generate")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=6, help="batches timed per worker count")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="cuda: pinned memory")
    p.add_argument("--step-json", default=None)
    p.add_argument("--budget-s", type=float, default=float("inf"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(args.images or tmp), args.count)
        demand = step_demand(args.step_json)
        crop_bytes = 2 * 3 * 224 * 224 * torch.float32.itemsize
        table = Table(f"bench_data: the reference pipeline (--augment cpu), {args.count} JPEGs ~500x375 q90, batch "
                      f"{args.batch}, two 224 px fp32 views, {crop_bytes / 2**20:.2f} MiB per image through shared "
                      "memory", ["workers", "images/s", "images/s per worker", "ViT-B step consumes img/s",
                                 "loader / step"], args.budget_s)
        for w in args.workers:
            def run(w=w):
                rate = loader_rate(root, w, args.batch, args.batches, args.device == "cuda")
                return [f"{rate:.0f}", f"{rate / max(w, 1):.0f}", "n/a" if demand is None else f"{demand:.0f}",
                        "n/a" if demand is None else f"{rate / demand:.2f}"]
            table.row([w], run)
        return 1 if table.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
