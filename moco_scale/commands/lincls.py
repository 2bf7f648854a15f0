"""Linear evaluation on frozen features, as MoCo v3's: the pretrained online backbone frozen in eval
mode, fp32, a Linear classifier (N(0, 0.01), bias 0; optionally after a parameter-free BatchNorm),
SGD momentum 0.9, wd 0, global batch, per-epoch cosine lr = base x batch / 256. The run is assembled
in train/lincls.py on the shared Trainer.

One process:  moco-scale lincls [DATA] --pretrained runs/X/checkpoints/step_N (or any checkpoint)
torchrun:     torchrun --nproc_per_node N -m moco_scale lincls [DATA] --pretrained ...
DATA holds train/ and val/ ImageFolders (classes matched by name); without it, the built-in digits and their
held-out split. Every validation image is counted once, whatever the world size.
"""

from __future__ import annotations

import argparse
import sys

from moco_scale.commands import run_evaluation
from moco_scale.flags import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_interval
from moco_scale.train.lincls import lincls


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale lincls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/ (default: digits)")
    p.add_argument("--pretrained", required=True,
                   help="a moco-scale checkpoint (folder, run folder or .pth.tar) or a reference-format file")
    p.add_argument("-a", "--arch", default=None, help="checked against the checkpoint's (default: the checkpoint's)")
    p.add_argument("--epochs", type=positive_int, default=90)
    p.add_argument("-b", "--batch-size", type=positive_int, default=1024, help="global batch over all ranks")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="base lr (x batch / 256); default 3 for ViT, 0.1 ResNet")
    p.add_argument("--momentum", type=unit_interval, default=0.9)
    p.add_argument("--wd", type=nonnegative_float, default=0.0)
    p.add_argument("--bn", action="store_true", help="parameter-free BatchNorm before the classifier")
    p.add_argument("-j", "--workers", type=nonnegative_int, default=8, help="data loading workers per rank")
    p.add_argument("-p", "--print-freq", type=positive_int, default=1, help="evaluate every N epochs (and at the end)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--output-dir", default="runs/lincls")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an evaluation in --output-dir (moved aside until this one has saved)")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue: 'auto' = the newest checkpoint in --output-dir/checkpoints, or a checkpoint folder; "
                   "refused if it evaluated another --pretrained")
    p.add_argument("--keep-last", type=positive_int, default=2, metavar="K", help="resumable checkpoints to keep")
    p.add_argument("-e", "--evaluate", action="store_true",
                   help="only evaluate the classifier saved in --resume (the reference's -e)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # the deepspeed launcher passes --local_rank; the rank comes from LOCAL_RANK in the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    return run_evaluation("lincls", lincls, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
