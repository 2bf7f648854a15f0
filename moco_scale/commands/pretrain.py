"""MoCo v3 pretraining: the command line (the reference trainer's flags, and moco-scale's) and its errors.
The run itself is assembled in train/pretrain.py.

One process:  moco-scale pretrain [DATA] -a vit_small ...
torchrun:     torchrun --nproc_per_node N -m moco_scale pretrain [DATA] ...
DeepSpeed:    deepspeed --num_gpus N --module moco_scale pretrain [DATA] ...
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from moco_scale.checkpoint.io import NoSpaceError
from moco_scale.checkpoint.manager import EXPORT_EVERY
from moco_scale.config import ConfigError
from moco_scale.data import AUGMENT, BUILTIN_IMAGE_SIZE, DataError
from moco_scale.dist import shutdown, world_size_from_env
from moco_scale.flags import (
    crop_fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from moco_scale.models import ARCHS, UnknownArchError
from moco_scale.optim import OPTIMIZERS
from moco_scale.train.pretrain import pretrain

_IGNORED_REFERENCE_FLAGS = ("--world-size", "--rank", "--dist-url", "--dist-backend", "--gpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="ImageFolder root holding train/ (default: the built-in digits dataset)")
    ref = p.add_argument_group("reference trainer flags (same meaning as MoCo v3's main_moco.py)")
    ref.add_argument("-a", "--arch", default="resnet50", help=f"one of: {', '.join(ARCHS)}")
    ref.add_argument("-j", "--workers", type=nonnegative_int, default=32,
                     help="data loading workers per node, shared by its ranks (as in the reference)")
    ref.add_argument("--epochs", type=positive_int, default=100)
    ref.add_argument("-b", "--batch-size", type=positive_int, default=4096, help="global batch over all ranks")
    ref.add_argument("--lr", "--learning-rate", dest="lr", type=positive_float, default=0.6,
                     help="base lr; the lr used is lr * batch / 256")
    ref.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonnegative_float, default=1e-6)
    ref.add_argument("-p", "--print-freq", type=positive_int, default=10, help="log every N steps")
    ref.add_argument("--seed", type=nonnegative_int, default=0)
    ref.add_argument("--moco-dim", type=positive_int, default=256)
    ref.add_argument("--moco-mlp-dim", type=positive_int, default=4096)
    ref.add_argument("--moco-m", type=unit_interval, default=0.99)
    ref.add_argument("--moco-m-cos", action="store_true", help="cosine momentum schedule from --moco-m to 1")
    ref.add_argument("--moco-t", type=positive_float, default=1.0)
    ref.add_argument("--stop-grad-conv1", action="store_true")
    ref.add_argument("--optimizer", default="lars", choices=OPTIMIZERS)
    ref.add_argument("--warmup-epochs", type=nonnegative_int, default=10)
    ref.add_argument("--crop-min", type=crop_fraction, default=0.08)
    ref.add_argument("--multiprocessing-distributed", action="store_true",
                     help="accepted for compatibility; the launcher decides the processes")
    for flag in _IGNORED_REFERENCE_FLAGS:
        ref.add_argument(flag, default=None, help=argparse.SUPPRESS)
    own = p.add_argument_group("moco-scale")
    own.add_argument("--engine-config", default=None, help="engine JSON in ds_configs/ (default: DDP defaults)")
    own.add_argument("--output-dir", default="runs/pretrain")
    own.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    own.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps (schedules "
                     "still span --epochs)")
    own.add_argument("--resume", default=None, metavar="auto|PATH",
                     help="continue a run: 'auto' = the newest complete checkpoint in --output-dir (or a fresh "
                     "start when there is none); PATH = a checkpoint folder, a run folder, or a reference-format "
                     "file (.pth.tar, published pretrained files included)")
    own.add_argument("--save-every", type=nonnegative_int, default=0, metavar="N",
                     help="also save a resumable checkpoint every N steps (always: at each epoch end)")
    own.add_argument("--keep-last", type=positive_int, default=2, metavar="K", help="resumable checkpoints to keep")
    own.add_argument("--reference-every", default="epoch", choices=EXPORT_EVERY,
                     help="when to write DIR/checkpoint.pth.tar, the reference's single file (rank 0 gathers it on the "
                     "CPU one tensor at a time): at each epoch end as the reference does, at the end only, or never "
                     "(convert --to reference makes it from any checkpoint folder)")
    own.add_argument("--image-size", type=positive_int, default=None,
                     help=f"crop size (default 224; {BUILTIN_IMAGE_SIZE} for the built-in dataset)")
    own.add_argument("--patch-size", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--embed-dim", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--depth", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--num-heads", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--peak-tflops", type=positive_float, default=None, metavar="T",
                     help="the device's peak TFLOP/s per GPU for MFU (default: known for A100/H100/H200/V100)")
    own.add_argument("--backbone-chunk", type=nonnegative_int, default=None, metavar="K",
                     help="run the ViT backbone over chunks of K images with recomputation: memory follows K, "
                     "the gradients do not change (default: the engine JSON's backbone_chunk, 0 = off)")
    own.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    own.add_argument("--dist-timeout", type=positive_float, default=1800.0,
                     help="seconds a collective may wait before the job fails (a dead rank)")
    own.add_argument("--augment", default="cpu", choices=AUGMENT,
                     help="cpu: the reference pipeline (PIL) in the loader workers, uint8 views to the device; device: "
                     "the workers only decode and draw each view's parameters, every random op runs batched on the "
                     "training device (same parameter draws, same distribution; for GPUs the workers cannot feed)")
    own.add_argument("--knn-every", type=nonnegative_int, default=0, metavar="N",
                     help="every N epochs (and at the end) the weighted kNN top-1 (k=20, 200) of the base and momentum "
                     "encoders' features, logged as knn_top1 / momentum_knn_top1 (default 0: off)")
    own.add_argument("--knn-data", default=None, metavar="DIR",
                     help="train/ and val/ ImageFolders for --knn-every (default: DATA; the digits' held-out split "
                     "for the built-in dataset)")
    own.add_argument("--knn-train-size", type=positive_int, default=10000, metavar="N",
                     help="training images the kNN compares against, spread evenly over train/ (default 10000)")
    own.add_argument("--skip-bad-data", action="store_true",
                     help="skip and count unreadable images and empty class folders instead of failing")
    own.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _is_collective_failure(e: RuntimeError) -> bool:
    """A peer died (kill -9, the OOM killer, a lost node) or the network dropped: gloo and NCCL raise
    RuntimeError (DistError in newer paths) from inside whichever collective noticed first."""
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = [f for f in _IGNORED_REFERENCE_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        print(f"moco-scale: ignoring {', '.join(given)}: the launcher (torchrun, deepspeed) sets the "
              "process group", file=sys.stderr)
    try:
        pretrain(args)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asked for a save at the next step
        print("moco-scale pretrain: aborted by a second Ctrl-C; the newest checkpoint in --output-dir is intact "
              "(continue with --resume auto)", file=sys.stderr)
        return 130
    except NoSpaceError as e:
        print(f"moco-scale pretrain: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, UnknownArchError, ValueError) as e:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and world_size_from_env() > 1 else ""
        print(f"moco-scale pretrain: error{where}: {e}", file=sys.stderr)
        # No barrier here: the other ranks may be blocked in a collective. Exiting lets the
        # launcher (torchrun, deepspeed) stop them at once instead of after --dist-timeout.
        return 2
    except RuntimeError as e:
        if not _is_collective_failure(e):
            raise
        rank = os.environ.get("RANK")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moco-scale pretrain: error (rank {rank}): a collective failed, so another rank died or the network "
              f"dropped ({first}); continue with --resume auto from the last checkpoint", file=sys.stderr)
        return 1
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
