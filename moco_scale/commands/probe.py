"""Frozen-feature probe: kNN and linear accuracy of a pretrained encoder against the same encoder
at its random initialisation, on the built-in digits (or DATA/train and DATA/val)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moco_scale.checkpoint.reference import load_pretrained
from moco_scale.config import ConfigError
from moco_scale.data import DataError, eval_transform, image_folder, load_digits_split
from moco_scale.flags import nonnegative_int
from moco_scale.models import MoCo, backbone_features, build_moco


@torch.no_grad()
def extract_features(model: MoCo, samples, transform, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Backbone features (ViT cls token after the last norm / ResNet pool) of the base encoder, eval mode."""
    model.eval()
    loader = DataLoader([(transform(img), label) for img, label in samples], batch_size=batch_size)
    feats, labels = [], []
    for x, y in loader:
        feats.append(backbone_features(model.base_encoder, x))
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 k: int = 20, temperature: float = 0.07) -> float:
    """Weighted kNN on cosine similarity (votes exp(sim / T)), top-1 in percent."""
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    sim, idx = (test_f @ train_f.t()).topk(k, dim=1)
    votes = torch.zeros(test_f.shape[0], int(train_y.max()) + 1)
    votes.scatter_add_(1, train_y[idx], (sim / temperature).exp())
    return (votes.argmax(1) == test_y).float().mean().item() * 100


def linear_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor) -> float:
    """Logistic regression on standardised frozen features, top-1 in percent."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000))
    clf.fit(train_f.numpy(), train_y.numpy())
    return float(clf.score(test_f.numpy(), test_y.numpy()) * 100)


def evaluate(model: MoCo, train, val, transform) -> dict[str, float]:
    tf, ty = extract_features(model, train, transform)
    vf, vy = extract_features(model, val, transform)
    return {"knn_top1": knn_accuracy(tf, ty, vf, vy), "linear_top1": linear_accuracy(tf, ty, vf, vy)}


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
    # the run folder: the checkpoint file's folder, or the folder named (a run folder or a step folder in it)
    run_dir = os.path.abspath(args.pretrained)
    run_dir = run_dir if os.path.isfile(os.path.join(run_dir, "config.json")) else os.path.dirname(run_dir)
    if os.path.basename(run_dir) == "checkpoints":
        run_dir = os.path.dirname(run_dir)
    seed = args.seed
    if seed is None and os.path.exists(os.path.join(run_dir, "config.json")):
        with open(os.path.join(run_dir, "config.json")) as f:
            seed = json.load(f).get("args", {}).get("seed")
    torch.manual_seed(seed or 0)
    random_init = build_moco(**kwargs)  # the run's starting point when the seed matches
    size = kwargs.get("img_size") or 224
    if args.data is None:
        train, val = load_digits_split("train", size), load_digits_split("val", size)
        transform = eval_transform(size)
    else:
        train, val = image_folder(os.path.join(args.data, "train")), image_folder(os.path.join(args.data, "val"))
        transform = eval_transform(size, resize=size * 256 // 224)
    results = {"random_init": evaluate(random_init, train, val, transform),
               "pretrained": evaluate(pretrained, train, val, transform),
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
