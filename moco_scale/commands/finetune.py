"""End-to-end fine-tuning and transfer learning of a pretrained backbone with a published recipe, on the same
engines and launchers as pretraining. The run is assembled in train/finetune.py on the shared Trainer.

One process:  moco-scale finetune [DATA] --pretrained CKPT --recipe deit ...
torchrun:     torchrun --nproc_per_node N -m moco_scale finetune DATA --pretrained CKPT ...
DeepSpeed:    deepspeed --num_gpus N --module moco_scale finetune DATA --pretrained CKPT \
                --engine-config ds_configs/zero3.json

Recipes (train/recipes.py): deit (MoCo v3's ImageNet fine-tuning, DeiT's defaults), mae (MAE's, layer decay),
cifar10, cifar100, flowers, pets (MoCo v3's transfer runs). Every value has a flag of the same name; --print-recipe
prints the resolved recipe as JSON and exits. DATA: an ImageFolder with train/ and val/, or with --dataset
cifar10|cifar100|flowers|pets the local root torchvision's class reads (never downloaded); default: the digits.
CKPT: any checkpoint moco-scale writes or reads, a DeiT/timm/torchvision export included.
"""

from __future__ import annotations

import argparse
import json
import sys

from moco_scale.commands import run_evaluation
from moco_scale.data.finetune import TORCHVISION
from moco_scale.flags import (
    crop_fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from moco_scale.train.recipes import RECIPES


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale finetune", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="ImageFolder root with train/ and val/, or --dataset's local root (default: the digits)")
    p.add_argument("--pretrained", default=None, help="the pretrained checkpoint (required unless --print-recipe)")
    p.add_argument("--recipe", default="deit", choices=list(RECIPES))
    p.add_argument("--print-recipe", action="store_true",
                   help="print the resolved recipe (for -a, -b and the flags) as one JSON object and exit")
    p.add_argument("--dataset", default=None, choices=list(TORCHVISION),
                   help="a torchvision dataset read from DATA (never downloaded)")
    p.add_argument("-a", "--arch", default=None, help="checked against the checkpoint's (an export's, if it has none)")
    p.add_argument("--num-heads", type=positive_int, default=None,
                   help="a ViT's heads: checked against the checkpoint's; for an export without a record (default: "
                   "MoCo v3's for the architecture, 12 for vit_small)")
    p.add_argument("--from-scratch", action="store_true",
                   help="train the checkpoint's architecture from random initialisation (the baseline to beat)")
    r = p.add_argument_group("recipe values (default: the recipe's)")
    r.add_argument("-b", "--batch-size", type=positive_int, default=None, help="global batch over all ranks")
    r.add_argument("--lr", type=positive_float, default=None,
                   help="base lr: the lr used is lr x batch / 512 (deit, transfer) or / 256 (mae)")
    r.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonnegative_float, default=None)
    r.add_argument("--epochs", type=positive_int, default=None)
    r.add_argument("--warmup-epochs", type=nonnegative_int, default=None)
    r.add_argument("--warmup-lr", type=nonnegative_float, default=None)
    r.add_argument("--min-lr", type=nonnegative_float, default=None)
    r.add_argument("--smoothing", type=unit_interval, default=None)
    r.add_argument("--mixup", type=nonnegative_float, default=None, help="Mixup alpha (0: off)")
    r.add_argument("--cutmix", type=nonnegative_float, default=None, help="CutMix alpha (0: off)")
    r.add_argument("--mixup-switch-prob", type=unit_interval, default=None)
    r.add_argument("--drop-path", type=unit_interval, default=None)
    r.add_argument("--aa", default=None, help="timm RandAugment string, or 'none'")
    r.add_argument("--reprob", type=unit_interval, default=None, help="random erasing probability")
    r.add_argument("--repeated-aug", type=positive_int, default=None,
                   help="repeated augmentation count when distributed (1: off)")
    r.add_argument("--layer-decay", type=positive_float, default=None, help="layer-wise lr decay (mae: 0.65)")
    r.add_argument("--crop-min", type=crop_fraction, default=None,
                   help="RandomResizedCrop's smallest area (deit, mae: 0.08; transfer: 0.05)")
    r.add_argument("--eval-crop-pct", type=positive_float, default=None)
    o = p.add_argument_group("run")
    o.add_argument("--engine-config", default=None, help="engine JSON in ds_configs/ (default: DDP defaults)")
    o.add_argument("--output-dir", default="runs/finetune")
    o.add_argument("--overwrite", action="store_true", help="replace a run in --output-dir")
    o.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue: 'auto' = the newest checkpoint in --output-dir, or a checkpoint folder")
    o.add_argument("--max-steps", type=positive_int, default=None, help="stop after N steps (schedules span --epochs)")
    o.add_argument("--save-every", type=nonnegative_int, default=0, metavar="N",
                   help="also save every N steps (always: at each epoch end)")
    o.add_argument("--keep-last", type=positive_int, default=2, metavar="K")
    o.add_argument("-p", "--print-freq", type=positive_int, default=10, help="log every N steps")
    o.add_argument("--eval-every", type=positive_int, default=1, metavar="N", help="evaluate every N epochs and at "
                   "the end")
    o.add_argument("-e", "--evaluate", action="store_true", help="only evaluate the checkpoint in --resume")
    o.add_argument("--seed", type=nonnegative_int, default=0)
    o.add_argument("-j", "--workers", type=nonnegative_int, default=32, help="data loading workers per node")
    o.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    o.add_argument("--dist-timeout", type=positive_float, default=1800.0)
    o.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def print_recipe(args: argparse.Namespace) -> dict:
    from moco_scale.train.finetune import recipe_from_args

    recipe = recipe_from_args(args, args.arch or "vit_base").to_json()
    print(json.dumps(recipe))
    return recipe


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.print_recipe:
        return run_evaluation("finetune", print_recipe, args)
    if args.pretrained is None:
        parser.error("--pretrained CKPT is required (the checkpoint to fine-tune)")
    from moco_scale.train.finetune import finetune

    return run_evaluation("finetune", finetune, args)


if __name__ == "__main__":
    sys.exit(main())
