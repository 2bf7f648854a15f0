"""Weighted kNN on frozen features, DINO's protocol (cosine similarity; the k nearest training images vote
with exp(sim / T); k = 20 and 200, T = 0.07), distributed and streaming so that it runs at ImageNet size:

- every rank extracts the features of its share of train and val (a `Shard` sampler: every image once) in
  batches from a DataLoader, L2-normalised, kept as fp32 or fp16 tensors; memory follows the features, never
  the images;
- train features stay where they were computed; val features are gathered to every rank (50,000 x 768 for
  ImageNet at ViT-B: 77 MB in fp16);
- val is walked in chunks: each rank finds the k nearest of its train share (train walked in chunks too, so
  no rank holds more than a chunk x chunk similarity block), the ranks exchange their (chunk x k) candidates,
  and every rank merges them into the global k nearest and counts the votes.

The top-k of the union of every rank's top-k is the global top-k, so the result does not depend on the world
size (tested against a plain one-matrix kNN in tests/, world 1, 2 and 3).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader

from moco_scale.dist import DistContext

KS = (20, 200)
TEMPERATURE = 0.07


@dataclass
class Features:
    """This rank's share of a split: L2-normalised features (n, d) and labels (n,), on the rank's device."""

    feats: torch.Tensor
    labels: torch.Tensor


@torch.no_grad()
def extract(features_of: Callable[[torch.Tensor], torch.Tensor], loader: DataLoader, device: torch.device,
            dtype: torch.dtype = torch.float32, normalize: bool = True) -> Features:
    """Features of every batch `loader` yields (this rank's share), L2-normalised in fp32 (what the kNN
    compares; `normalize=False` keeps them raw) and kept in `dtype`."""
    feats, labels = [], []
    for x, y in loader:
        f = features_of(x.to(device, non_blocking=True)).float()
        feats.append((F.normalize(f, dim=1) if normalize else f).to(dtype))
        labels.append(y.to(device))
    if not feats:
        raise ValueError("a rank got no image to evaluate: the split has fewer images than there are ranks")
    return Features(torch.cat(feats), torch.cat(labels))


def gather_split(local: Features, sizes: Sequence[int], ctx: DistContext) -> Features:
    """Every rank's share, concatenated in rank order (the split's order under `Shard`), on every rank.
    `sizes` are the shares' lengths, known to every rank without asking."""
    if not (ctx.is_distributed and ctx.world_size > 1):
        return local
    rows = max(sizes)
    pad = rows - local.feats.shape[0]
    feats = F.pad(local.feats, (0, 0, 0, pad))
    labels = F.pad(local.labels, (0, pad))
    all_feats = [torch.empty_like(feats) for _ in range(ctx.world_size)]
    all_labels = [torch.empty_like(labels) for _ in range(ctx.world_size)]
    dist.all_gather(all_feats, feats)
    dist.all_gather(all_labels, labels)
    return Features(torch.cat([f[:n] for f, n in zip(all_feats, sizes, strict=True)]),
                    torch.cat([y[:n] for y, n in zip(all_labels, sizes, strict=True)]))


def _local_topk(query: torch.Tensor, train: Features, k: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most similar of this rank's train features for each query row (similarities, labels), the
    train share walked in chunks with a running top-k."""
    best_sim = query.new_full((query.shape[0], 0), float("-inf"), dtype=torch.float32)
    best_lab = train.labels.new_empty((query.shape[0], 0))
    for start in range(0, train.feats.shape[0], chunk):
        sim = query.float() @ train.feats[start:start + chunk].float().T
        labels = train.labels[start:start + chunk].expand(query.shape[0], -1)
        sim, labels = torch.cat([best_sim, sim], 1), torch.cat([best_lab, labels], 1)
        best_sim, idx = sim.topk(min(k, sim.shape[1]), dim=1)
        best_lab = labels.gather(1, idx)
    return best_sim, best_lab


def _exchange(sim: torch.Tensor, labels: torch.Tensor, k: int, ctx: DistContext) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's candidates for the same query rows, merged into the global k nearest (sorted)."""
    if ctx.is_distributed and ctx.world_size > 1:
        # a rank with fewer than k train images pads with -inf, which never wins
        sim = F.pad(sim, (0, k - sim.shape[1]), value=float("-inf"))
        labels = F.pad(labels, (0, k - labels.shape[1]))
        sims = [torch.empty_like(sim) for _ in range(ctx.world_size)]
        labs = [torch.empty_like(labels) for _ in range(ctx.world_size)]
        dist.all_gather(sims, sim)
        dist.all_gather(labs, labels)
        sim, labels = torch.cat(sims, 1), torch.cat(labs, 1)
    top, idx = sim.topk(min(k, sim.shape[1]), dim=1)
    return top, labels.gather(1, idx)


def vote(sim: torch.Tensor, labels: torch.Tensor, k: int, classes: int, temperature: float) -> torch.Tensor:
    """Class scores from the k nearest (sorted by similarity): sum of exp(sim / T) per class."""
    weights = (sim[:, :k] / temperature).exp()
    scores = torch.zeros(sim.shape[0], classes, device=sim.device, dtype=weights.dtype)
    return scores.scatter_add_(1, labels[:, :k], weights)


@torch.no_grad()
def knn_accuracy(train: Features, val: Features, classes: int, ctx: DistContext, ks: Sequence[int] = KS,
                 temperature: float = TEMPERATURE, chunk: int = 1024) -> dict[str, float]:
    """Top-1 / top-5 (percent) of the weighted kNN for each k, `val` whole on every rank, `train` this rank's
    share. Keys: knn_top1, knn_top5 for the first k; knn{k}_top1, knn{k}_top5 for the others; knn_images."""
    kmax = max(ks)
    correct = torch.zeros(len(ks), 2, dtype=torch.int64, device=val.feats.device)
    for start in range(0, val.feats.shape[0], chunk):
        query, target = val.feats[start:start + chunk], val.labels[start:start + chunk]
        sim, labels = _exchange(*_local_topk(query, train, kmax, chunk), kmax, ctx)
        for i, k in enumerate(ks):
            top = vote(sim, labels, k, classes, temperature).topk(min(5, classes), dim=1).indices
            hit = top == target[:, None]
            correct[i, 0] += hit[:, 0].sum()
            correct[i, 1] += hit.any(1).sum()
    n = val.feats.shape[0]
    out: dict[str, float] = {}
    for i, k in enumerate(ks):
        prefix = "knn" if i == 0 else f"knn{k}"
        out[f"{prefix}_top1"] = 100.0 * correct[i, 0].item() / n
        out[f"{prefix}_top5"] = 100.0 * correct[i, 1].item() / n
    out["knn_images"] = n
    return out


def shard_sizes(n: int, world: int) -> list[int]:
    """The lengths of `Shard(n, world, r)` for every rank r."""
    per = -(-n // world)
    return [max(0, min(n, (r + 1) * per) - min(n, r * per)) for r in range(world)]


def evaluate_knn(features_of: Callable[[torch.Tensor], torch.Tensor], train_loader: DataLoader,
                 val_loader: DataLoader, classes: int, ctx: DistContext, dtype: torch.dtype = torch.float32,
                 ks: Sequence[int] = KS) -> dict[str, float]:
    """Extract train and val (each loader over a `Shard` of its split), gather val, run the kNN."""
    train = extract(features_of, train_loader, ctx.device, dtype)
    val = extract(features_of, val_loader, ctx.device, dtype)
    val = gather_split(val, shard_sizes(len(val_loader.dataset), ctx.world_size), ctx)
    return knn_accuracy(train, val, classes, ctx, ks)
