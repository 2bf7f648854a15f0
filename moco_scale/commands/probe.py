"""Frozen-feature probe: kNN and linear accuracy of a pretrained encoder against the same encoder
at its random initialisation, on the built-in digits (or DATA/train and DATA/val, classes matched by name).
One process; `moco-scale knn` is the distributed kNN for ImageNet-size data."""

from __future__ import annotations

import argparse
import json
import os
import sys
from functools import partial

import torch
import torch.nn.functional as F

from moco_scale.checkpoint.reference import load_pretrained
from moco_scale.checkpoint.resume import run_folder
from moco_scale.config import ConfigError
from moco_scale.data import DataError
from moco_scale.data.labelled import Splits, check_neighbours, image_splits, shard_loader, split_transform
from moco_scale.dist import DistContext
from moco_scale.eval.knn import Features, extract, knn_accuracy
from moco_scale.flags import nonnegative_int
from moco_scale.models import MoCo, backbone_features, build_moco


def linear_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> float:
    """Logistic regression on standardised frozen features, top-1 in percent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_f.numpy(), train_y.numpy())
    return float(clf.score(test_f.numpy(), test_y.numpy()) * 100)


def evaluate(model: MoCo, splits: Splits, transform) -> dict[str, float]:
    """kNN (k=20, T=0.07, the streaming one of `moco-scale knn`) and logistic regression on the base encoder's
    frozen features, extracted batch by batch (memory follows the features, not the images)."""
    model.eval()
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    train, val = (extract(partial(backbone_features, model.base_encoder), shard_loader(s, transform, 256, 1, 0),
                          ctx.device, normalize=False) for s in (splits.train, splits.val))
    unit = [Features(F.normalize(f.feats, dim=1), f.labels) for f in (train, val)]
    knn = knn_accuracy(*unit, len(splits.classes), ctx, ks=(20,))["knn_top1"]  # check_neighbours: >= 20 images
    return {"knn_top1": knn, "linear_top1": linear_accuracy(train.feats, train.labels, val.feats, val.labels)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moco-scale probe", description=__doc__)
    p.add_argument("data", nargs="?", default=None, help="ImageFolder root with train/ and val/ (default: digits)")
    p.add_argument("--pretrained", required=True, help="checkpoint written by moco-scale pretrain")
    p.add_argument("--seed", type=nonnegative_int, default=None,
                   help="seed of the random init (default: the run's seed)")
    args = p.parse_args(argv)
    try:
        return probe(args)
    except (ConfigError, DataError, FileNotFoundError, ValueError) as e:
        print(f"moco-scale probe: error: {e}", file=sys.stderr)
        return 2


def probe(args: argparse.Namespace) -> int:
    pretrained, kwargs, ckpt = load_pretrained(args.pretrained)
    meta = ckpt.get("moco_scale", {})
    run_dir = run_folder(args.pretrained)
    seed = args.seed
    if seed is None and os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            seed = json.load(f).get("args", {}).get("seed")
    torch.manual_seed(seed or 0)
    random_init = build_moco(**kwargs)  # the run's starting point when the seed matches
    size = kwargs.get("img_size") or 224
    splits = image_splits(args.data, size)
    check_neighbours(splits, 20)
    transform = split_transform(args.data, size)
    results = {"random_init": evaluate(random_init, splits, transform),
               "pretrained": evaluate(pretrained, splits, transform),
               "checkpoint": args.pretrained, "steps": meta.get("step")}
    print(f"\nfrozen features of {kwargs['arch']} on {args.data or 'the built-in digits (held-out split)'}:")
    print(f"  {'encoder':14s} {'kNN top-1':>10s} {'linear top-1':>13s}")
    for name in ("random_init", "pretrained"):
        r = results[name]
        print(f"  {name.replace('_', ' '):14s} {r['knn_top1']:9.2f}% {r['linear_top1']:12.2f}%")
    with open(os.path.join(run_dir, "probe.json"), "w") as f:
        json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
