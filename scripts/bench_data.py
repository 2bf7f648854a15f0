"""Benchmark: the pretraining data path alone (decode, two augmented views, collate, pinned transfer, the
device's part) on ImageNet-like JPEGs made from scikit-image's photos (moco_scale/data/photos.py), per
`--augment` and loader worker count, against the images/s a training step consumes.

    python scripts/bench_data.py --workers 1 2                  # this machine, the CPU as the device
    python scripts/bench_data.py --device cuda --workers 2 4 8 14 --step-json runs/gpu_check/bench_gpu.json

"per core" is images per CPU-second of the whole job (main process and workers, user + system), so a path that
moves work from the workers to the device's CPU threads is charged for it. The row "device, host part" is
`--augment device` without the device's part (the loader's batches as they reach the main process): the CPU a
GPU node pays per image on that path, to set against the reference's. `--step-json` is bench_gpu.py's
--json output: its fastest vit_base row's images/s is what the loader must keep up with.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch.utils.data import DataLoader

from moco_scale.data import DeviceFeed, GlobalBatchSampler, pretrain_dataset
from moco_scale.data.feed import batch_tensors
from moco_scale.data.photos import write_photo_folder
from moco_scale.dist import keep_freed_memory
from moco_scale.telemetry import CheckTable as Table


def cpu_seconds() -> float:
    """User + system CPU time of this process and its live children (the loader workers)."""
    me = psutil.Process()
    total = 0.0
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


class Tap:
    """The loader's batches as they pass, to measure their bytes."""

    def __init__(self, loader) -> None:
        self.loader, self.bytes, self.images = loader, 0, 0

    def __iter__(self):
        for batch in self.loader:
            self.bytes += sum(t.nbytes for t in batch_tensors(batch))  # as they cross shared memory
            self.images += len(batch) if not isinstance(batch, tuple | list) else batch[0].shape[0]
            yield batch


def measure(root: Path, augment: str, workers: int, size: int, batch: int, batches: int,
            device: torch.device, host_only: bool = False) -> dict[str, float]:
    """Images/s, images per CPU-second and bytes per image of the data path over `batches` batches, after one
    batch per worker untimed (then each worker is one batch into its work at both ends of the timing, so the
    prefetched batches do not flatter it); `host_only`: the loader's batches as they reach the main process
    (pinned on CUDA), without the copy or the device's part."""
    dataset = pretrain_dataset(str(root), size, 0.08, seed=0, augment=augment)
    warmup = max(workers, 1)
    # keys past the folder's end wrap onto its images with fresh random views (KeyedTwoViews takes index % len)
    sampler = GlobalBatchSampler((warmup + batches) * batch, batch)
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=workers, pin_memory=device.type == "cuda",
                        persistent_workers=workers > 0, collate_fn=dataset.collate)  # alive to read their CPU time
    tap = Tap(loader)
    it = iter(tap if host_only else DeviceFeed(tap, device, dataset.on_device))
    for _ in range(warmup):
        next(it)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, cpu0, seen = time.perf_counter(), cpu_seconds(), 0
    for out in it:
        seen += len(out) if host_only else out[0].shape[0]
    sync()
    wall, cpu = time.perf_counter() - start, cpu_seconds() - cpu0
    out = {"img_s": seen / wall, "img_cpu_s": seen / cpu, "bytes": tap.bytes / max(tap.images, 1)}
    del it, loader
    return out


def step_demand(path: str | None) -> float | None:
    if not path or not Path(path).exists():
        return None
    rows = [r for r in json.loads(Path(path).read_text()) if r["arch"] == "vit_base"]
    return max((r["img_per_s"] for r in rows), default=None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--augment", nargs="+", default=["cpu", "device"], choices=("cpu", "device"))
    p.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    p.add_argument("--images", default=None, help="folder for the generated JPEGs (kept; default: temporary)")
    p.add_argument("--count", type=int, default=256, help="JPEGs to generate (batches past them wrap, new views)")
    p.add_argument("--size", type=int, default=224, help="crop size")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--batches", type=int, default=3, help="batches timed per row")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--threads", type=int, default=None, help="torch threads of the main process (CPU device)")
    p.add_argument("--step-json", default=None)
    p.add_argument("--budget-s", type=float, default=float("inf"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    allocator = "glibc defaults"
    if device.type == "cpu" and keep_freed_memory():
        allocator = "keep_freed_memory"
    with tempfile.TemporaryDirectory() as tmp:
        root = write_photo_folder(Path(args.images or tmp), args.count)
        demand = step_demand(args.step_json)
        table = Table(f"bench_data: {args.count} JPEGs from scikit-image photos (~500x375, q90, some grayscale and "
                      f"CMYK), batch {args.batch}, two {args.size} px views, the device's part on {device} "
                      f"({torch.get_num_threads()} threads, allocator {allocator}); "
                      "per core = images per CPU-second of the whole job",
                      ["augment", "workers", "images/s", "images/s per core", "x reference per core",
                       "KiB per image through shared memory", "ViT-B step consumes img/s", "loader / step"],
                      args.budget_s)
        reference: dict[int, float] = {}
        rows = [(a, False) for a in args.augment] + [("device", True)] * ("device" in args.augment)
        for w in args.workers:
            for augment, host_only in rows:
                def run(w=w, augment=augment, host_only=host_only):
                    r = measure(root, augment, w, args.size, args.batch, args.batches, device, host_only)
                    if augment == "cpu":
                        reference[w] = r["img_cpu_s"]
                    ratio = f"{r['img_cpu_s'] / reference[w]:.2f}" if w in reference else "n/a"
                    return [f"{r['img_s']:.0f}", f"{r['img_cpu_s']:.0f}", ratio, f"{r['bytes'] / 1024:.0f}",
                            "n/a" if demand is None else f"{demand:.0f}",
                            "n/a" if demand is None else f"{r['img_s'] / demand:.2f}"]
                table.row(["device, host part" if host_only else augment, w], run)
        return 1 if table.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
