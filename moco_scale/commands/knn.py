"""Weighted kNN accuracy of a pretrained encoder's frozen features (DINO's protocol: k = 20 and 200, T = 0.07),
at ImageNet size: every rank extracts its share of train and val from a DataLoader, features (never images) are
exchanged, and the similarity is computed in chunks (moco_scale/eval/knn.py).

One process:  moco-scale knn [DATA] --pretrained runs/X            (or any checkpoint moco-scale reads)
torchrun:     torchrun --nproc_per_node 8 -m moco_scale knn DATA --pretrained ...
deepspeed:    deepspeed --num_gpus 8 --module moco_scale knn DATA --pretrained ...
DATA holds train/ and val/ ImageFolders (classes matched by name); without it, the built-in digits and their
held-out split. The result is the same at any world size.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch

from moco_scale.checkpoint.io import atomic_write_text
from moco_scale.checkpoint.reference import checkpoint_identity, pretrained_encoder
from moco_scale.checkpoint.resume import run_folder
from moco_scale.commands import run_evaluation
from moco_scale.config import ConfigError
from moco_scale.data.labelled import knn_splits, shard_loader, split_transform
from moco_scale.dist import init_distributed, world_size_from_env
from moco_scale.eval.knn import evaluate_knn
from moco_scale.flags import nonnegative_int, positive_int
from moco_scale.models.parts import backbone_features
from moco_scale.paths import writable_file_problem


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale knn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/ (default: digits)")
    p.add_argument("--pretrained", required=True,
                   help="a moco-scale checkpoint (folder, run folder or .pth.tar) or a reference-format file")
    p.add_argument("-a", "--arch", default=None, help="checked against the checkpoint's (default: the checkpoint's)")
    p.add_argument("-b", "--batch-size", type=positive_int, default=256, help="images per rank per forward")
    p.add_argument("-j", "--workers", type=nonnegative_int, default=8, help="data loading workers per rank")
    p.add_argument("--train-size", type=positive_int, default=None, metavar="N",
                   help="use N training images spread evenly over train/ (default: all)")
    p.add_argument("--features", default="auto", choices=("auto", "fp32", "fp16"),
                   help="how features are kept (auto: fp16 on a GPU, fp32 on the CPU)")
    p.add_argument("--output", default=None, help="results JSON (default: knn.json in the checkpoint's run folder)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def knn(args: argparse.Namespace) -> dict[str, Any]:
    """Every input checked first (checkpoint, data), then the process group; returns the results (rank 0 writes
    them)."""
    encoder, _, state, settings = pretrained_encoder(args.pretrained, args.arch)
    path = args.output or os.path.join(run_folder(args.pretrained), "knn.json")
    if why := writable_file_problem(path):
        flag = "--output" if args.output else "the default --output"
        raise ConfigError(f"{flag} {path} {why}" + ("" if args.output else "; name another with --output"))
    size = settings.get("img_size") or 224
    splits = knn_splits(args.data, size, args.train_size, world_size_from_env())
    train = splits.train
    ctx = init_distributed(args.device, require_group=False)
    encoder.load_state_dict(state, assign=True)
    encoder.to(ctx.device).eval()
    transform = split_transform(args.data, size)
    loaders = [shard_loader(s, transform, args.batch_size, ctx.world_size, ctx.rank, args.workers)
               for s in (train, splits.val)]
    dtype = {"fp32": torch.float32, "fp16": torch.float16}.get(args.features,
                                                                 torch.float16 if ctx.device.type == "cuda" else
                                                                 torch.float32)
    results = evaluate_knn(lambda x: backbone_features(encoder, x), *loaders, len(splits.classes), ctx, dtype)
    out = {**results, "pretrained": checkpoint_identity(args.pretrained), "arch": settings["arch"],
           "data": splits.source, "train_images": len(train), "world_size": ctx.world_size,
           "features": str(dtype).removeprefix("torch.")}
    if ctx.is_main:
        print(f"knn: {settings['arch']} on {splits.source} ({len(train)} train / {len(splits.val)} val images, "
              f"world {ctx.world_size}): k=20 top-1 {out['knn_top1']:.2f}% top-5 {out['knn_top5']:.2f}%, k=200 "
              f"top-1 {out['knn200_top1']:.2f}%", flush=True)
        try:
            atomic_write_text(Path(path), json.dumps(out, indent=2))
        except OSError as e:
            raise ConfigError(f"--output {path} cannot be written ({e.strerror or e}); the results are above") from e
        print(f"knn: written to {path}", flush=True)
    return out


def main(argv: list[str] | None = None) -> int:
    return run_evaluation("knn", knn, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
