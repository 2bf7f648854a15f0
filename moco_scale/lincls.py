"""Linear evaluation on frozen features, as MoCo v3's: the pretrained online backbone frozen in eval
mode, fp32, a Linear classifier (N(0, 0.01), bias 0; optionally after a parameter-free BatchNorm),
SGD momentum 0.9, wd 0, global batch, per-epoch cosine lr = base x batch / 256.

One process:  moco-scale lincls [DATA] --pretrained runs/X/checkpoints/step_N (or any checkpoint)
torchrun:     torchrun --nproc_per_node N -m moco_scale.lincls [DATA] --pretrained ...
DATA holds train/ and val/ ImageFolders; without it, the built-in digits and their held-out split.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Any

import torch
import torch.nn.functional as F
import torchvision.transforms as T
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from moco_scale.config import ConfigError
from moco_scale.convert import backbone
from moco_scale.data import DataError, eval_transform, image_folder, load_digits_split
from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_scale.dist import init_distributed, shutdown
from moco_scale.files import atomic_save, load_checkpoint
from moco_scale.flags import nonnegative_float, nonnegative_int, positive_float, positive_int, unit_interval
from moco_scale.loading import load_pretrained
from moco_scale.models import ARCHS, backbone_features
from moco_scale.models.vit import VIT_ARCHS


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
    p.add_argument("--resume", default=None, metavar="auto|PATH", help="'auto': DIR/lincls_checkpoint.pth.tar")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    # the deepspeed launcher passes --local_rank; the rank comes from LOCAL_RANK in the environment
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def pretrained_backbone(path: str, arch: str | None) -> tuple[nn.Module, dict[str, Any], dict[str, torch.Tensor]]:
    """The online backbone of any checkpoint, loaded; refuses another architecture with the keys at fault."""
    model, settings, _ = load_pretrained(path)
    if arch is not None and arch != settings["arch"]:
        raise ConfigError(f"--pretrained {path} holds {settings['arch']}, not -a {arch}")
    weights = backbone({f"base_encoder.{k}": v for k, v in model.base_encoder.state_dict().items()}, settings["arch"])
    return model.base_encoder, settings, {k: v.clone() for k, v in weights.items()}


class _Transformed(Dataset):
    def __init__(self, samples, transform) -> None:
        self.samples, self.transform = samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int):
        img, label = self.samples[i]
        return self.transform(img), label


def datasets(data: str | None, size: int) -> tuple[Dataset, Dataset, int]:
    if data is None:
        train, val = load_digits_split("train", size), load_digits_split("val", size)
        val_tf = eval_transform(size)
    else:
        for split in ("train", "val"):
            if not os.path.isdir(os.path.join(data, split)):
                raise DataError(f"data folder {data} has no {split}/ folder")
        train, val = image_folder(os.path.join(data, "train")), image_folder(os.path.join(data, "val"))
        val_tf = eval_transform(size, resize=size * 256 // 224)
    train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                          T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    classes = len(train.classes) if hasattr(train, "classes") else 1 + max(label for _, label in train)
    return _Transformed(train, train_tf), _Transformed(val, val_tf), classes


def feature_dim(encoder: nn.Module, size: int) -> int:
    with torch.no_grad():
        return backbone_features(encoder, torch.zeros(1, 3, size, size)).shape[1]


@torch.no_grad()
def evaluate(encoder: nn.Module, classifier: nn.Module, loader: DataLoader, device: torch.device) -> dict[str, float]:
    """Top-1 / top-5 (percent) over the whole val set: each rank scores its share, counts are summed."""
    classifier.eval()
    counts = torch.zeros(3, dtype=torch.float64, device=device)
    for x, y in loader:
        x, y = x.to(device), y.to(device)
        top = classifier(backbone_features(encoder, x)).topk(min(5, classifier_out(classifier)), dim=1).indices
        hit = top == y[:, None]
        counts += torch.stack([hit[:, 0].sum(), hit.any(1).sum(), torch.tensor(len(y), device=device)]).double()
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    classifier.train()
    return {"top1": 100 * counts[0].item() / counts[2].item(), "top5": 100 * counts[1].item() / counts[2].item()}


def classifier_out(classifier: nn.Module) -> int:
    module = classifier.module if isinstance(classifier, DistributedDataParallel) else classifier
    return module[-1].out_features


def run(args: argparse.Namespace) -> dict[str, Any]:
    encoder, settings, loaded = pretrained_backbone(args.pretrained, args.arch)
    size = settings.get("img_size") or 224
    train_set, val_set, classes = datasets(args.data, size)
    ctx = init_distributed(args.device, require_group=False)
    if args.batch_size % ctx.world_size or args.batch_size > len(train_set):
        raise ConfigError(f"-b {args.batch_size} must divide by the world size {ctx.world_size} and not exceed "
                          f"the {len(train_set)} training images")
    torch.manual_seed(args.seed)
    encoder = encoder.to(ctx.device).eval().requires_grad_(False)  # frozen, BN statistics too
    dim = feature_dim(encoder.cpu(), size)
    encoder.to(ctx.device)
    head = nn.Linear(dim, classes)
    nn.init.normal_(head.weight, 0.0, 0.01)
    nn.init.zeros_(head.bias)
    norm = [nn.BatchNorm1d(dim, affine=False)] if args.bn else []
    classifier: nn.Module = nn.Sequential(*norm, head).to(ctx.device)
    params = list(classifier.parameters())
    if ctx.is_distributed and ctx.world_size > 1:
        classifier = DistributedDataParallel(classifier)
    base_lr = args.lr if args.lr is not None else (3.0 if settings["arch"] in VIT_ARCHS else 0.1)
    lr = base_lr * args.batch_size / 256
    optimizer = torch.optim.SGD(params, lr=lr, momentum=args.momentum, weight_decay=args.wd)
    sampler = DistributedSampler(train_set, ctx.world_size, ctx.rank, shuffle=True, seed=args.seed, drop_last=True)
    train_loader = DataLoader(train_set, batch_size=args.batch_size // ctx.world_size, sampler=sampler,
                              num_workers=args.workers, drop_last=True)
    val_loader = DataLoader(val_set, batch_size=256, num_workers=args.workers,
                            sampler=DistributedSampler(val_set, ctx.world_size, ctx.rank, shuffle=False))

    os.makedirs(args.output_dir, exist_ok=True)
    ckpt_path = os.path.join(args.output_dir, "lincls_checkpoint.pth.tar")
    start_epoch, history = 0, []
    resume = ckpt_path if args.resume == "auto" and os.path.exists(ckpt_path) else args.resume
    if resume not in (None, "auto"):
        state = load_checkpoint(resume)
        if state.get("pretrained_arch") != settings["arch"]:
            raise ConfigError(f"--resume {resume} is a linear evaluation of {state.get('pretrained_arch')}")
        params_module = classifier.module if isinstance(classifier, DistributedDataParallel) else classifier
        params_module.load_state_dict(state["classifier"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch, history = state["epoch"], state["history"]

    main = ctx.is_main
    if main:
        print(f"lincls: {settings['arch']} from {args.pretrained}, {classes} classes, {len(train_set)} train / "
              f"{len(val_set)} val images, world {ctx.world_size}, batch {args.batch_size}, lr {lr:g}", flush=True)
    for epoch in range(start_epoch, args.epochs):
        for group in optimizer.param_groups:  # per-epoch cosine, no warmup
            group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * epoch / args.epochs))
        sampler.set_epoch(epoch)
        total = 0.0
        for x, y in train_loader:
            x, y = x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)
            with torch.no_grad():
                feats = backbone_features(encoder, x)
            loss = F.cross_entropy(classifier(feats), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item()
        if epoch == start_epoch:  # the reference's sanity check: nothing but the classifier moved
            for k, v in encoder.state_dict().items():
                if k in loaded and not torch.equal(v.cpu(), loaded[k]):
                    raise RuntimeError(f"the frozen backbone changed during training ({k})")
        record = {"epoch": epoch + 1, "loss": total / max(1, len(train_loader))}
        if (epoch + 1) % args.print_freq == 0 or epoch + 1 == args.epochs:
            record.update(evaluate(encoder, classifier, val_loader, ctx.device))
        history.append(record)
        if main:
            print(json.dumps(record), flush=True)
            module = classifier.module if isinstance(classifier, DistributedDataParallel) else classifier
            atomic_save({"epoch": epoch + 1, "classifier": module.state_dict(), "optimizer": optimizer.state_dict(),
                         "history": history, "pretrained": args.pretrained, "pretrained_arch": settings["arch"]},
                        ckpt_path)
    final = next((h for h in reversed(history) if "top1" in h), {})
    summary = {"pretrained": args.pretrained, "arch": settings["arch"], "epochs": args.epochs,
               "top1": final.get("top1"), "top5": final.get("top5"), "history": history}
    if main:
        with open(os.path.join(args.output_dir, "lincls.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(f"lincls: top-1 {final.get('top1', float('nan')):.2f}%, top-5 {final.get('top5', float('nan')):.2f}% "
              f"on {args.data or 'the built-in digits (held-out split)'}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.arch is not None and args.arch not in ARCHS:
        print(f"moco-scale lincls: error: unknown architecture -a {args.arch}", file=sys.stderr)
        return 2
    try:
        run(args)
    except (ConfigError, DataError, ValueError, FileNotFoundError) as e:
        print(f"moco-scale lincls: error: {e}", file=sys.stderr)
        return 2
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
