"""SyncBatchNorm on gloo vs torch's BatchNorm over the concatenated batch: outputs, grads, running stats."""

from __future__ import annotations

import pytest
import torch
from helpers import spawn
from torch import nn

from moco_scale.models import SyncBatchNorm

SHAPES = {"1d": (6,), "2d": (3, 4, 4)}  # channels, then spatial dims of each sample


def full_batch(kind: str, counts: list[int]):
    g = torch.Generator().manual_seed(0)
    c = SHAPES[kind]
    x = torch.randn(sum(counts), 6 if kind == "1d" else 3, *c[1:], generator=g) * 3 + 1
    w = torch.randn(x.shape, generator=g)  # a fixed random read-out, so the loss is not trivial
    return x, w


def reference(kind: str, counts: list[int]):
    torch.manual_seed(0)
    x, w = full_batch(kind, counts)
    x.requires_grad_(True)
    bn = (nn.BatchNorm1d if kind == "1d" else nn.BatchNorm2d)(x.shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(x)
    (y * w).sum().backward()
    return y.detach(), x.grad, bn.weight.grad, bn.bias.grad, bn.running_mean, bn.running_var


def worker(ctx, kind: str, counts: list[int], out):
    torch.manual_seed(0)
    x, w = full_batch(kind, counts)
    start = sum(counts[:ctx.rank])
    xs = x[start:start + counts[ctx.rank]].clone().requires_grad_(True)
    bn = SyncBatchNorm(x.shape[1])
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    y = bn(xs)
    (y * w[start:start + counts[ctx.rank]]).sum().backward()
    grads = torch.cat([bn.weight.grad, bn.bias.grad])
    torch.distributed.all_reduce(grads)
    torch.save((y.detach(), xs.grad, grads, bn.running_mean, bn.running_var), out / f"{ctx.rank}.pt")


@pytest.mark.parametrize("kind,counts", [("1d", [4, 4]), ("2d", [2, 3, 5])])
def test_sync_bn_matches_full_batch(kind, counts, tmp_path):
    spawn(worker, len(counts), kind, counts, tmp_path)
    parts = [torch.load(tmp_path / f"{r}.pt") for r in range(len(counts))]
    y, gx = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    _, _, grads, rm, rv = parts[-1]  # every rank ends with the same statistics and reduced grads
    ry, rgx, rgw, rgb, rrm, rrv = reference(kind, counts)
    torch.testing.assert_close(y, ry, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, rgx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grads, torch.cat([rgw, rgb]), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm, rrm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv, rrv, rtol=1e-5, atol=1e-6)


def test_single_process_and_eval_are_plain_batchnorm():
    torch.manual_seed(0)
    x = torch.randn(8, 5)
    plain, sync = nn.BatchNorm1d(5), SyncBatchNorm(5)
    torch.testing.assert_close(sync(x), plain(x))
    torch.testing.assert_close(sync.running_var, plain.running_var)
    sync.eval()
    plain.eval()
    torch.testing.assert_close(sync(x * 2), plain(x * 2))
