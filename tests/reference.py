"""The oracle: MoCo v3 in one plain process, written from ../shared/MOCO_V3_SPEC.md.

Device-agnostic: it runs wherever the modules it is given live (CPU here, CUDA in tests/gpu_equivalence.py).

It shares no training code with moco_scale: its own schedules, EMA, InfoNCE (no gather,
labels = arange), LARS and the reference's call order (base encoder per view, momentum
update before the keys). It takes the networks (backbone + heads) as built modules and
turns every BatchNorm into torch's own, so synced BN is checked against plain BN.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


def lr_at(ep: float, base_lr: float, batch: int, epochs: int, warmup: float) -> float:
    lr = base_lr * batch / 256
    if ep < warmup:
        return lr * ep / warmup
    return lr * 0.5 * (1 + math.cos(math.pi * (ep - warmup) / (epochs - warmup)))


def m_at(ep: float, m0: float, epochs: int, cos: bool) -> float:
    return 1 - 0.5 * (1 + math.cos(math.pi * ep / epochs)) * (1 - m0) if cos else m0


class PlainBN(_BatchNorm):
    """torch's own BatchNorm forward for any input rank."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        pass


def plain_copy(module: nn.Module) -> nn.Module:
    """A deep copy with every BatchNorm replaced by torch's unsynchronised one."""
    module = copy.deepcopy(module)

    def swap(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, _BatchNorm):
                bn = PlainBN(child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats)
                like = next(itertools.chain((b for b in child.buffers() if b.is_floating_point()),
                                            child.parameters()), None)
                if like is not None:
                    bn.to(device=like.device, dtype=like.dtype)
                bn.load_state_dict(child.state_dict())
                for pname, p in child.named_parameters(recurse=False):
                    getattr(bn, pname).requires_grad_(p.requires_grad)
                setattr(m, name, bn)
            else:
                swap(child)

    swap(module)
    return module


def infonce(q: torch.Tensor, k: torch.Tensor, T: float) -> torch.Tensor:
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / T
    return F.cross_entropy(logits, torch.arange(q.shape[0], device=q.device)) * 2 * T


class OracleLARS:
    """The spec's LARS, parameter by parameter."""

    def __init__(self, params: list[nn.Parameter], wd: float, momentum: float = 0.9, trust: float = 0.001):
        self.params, self.wd, self.momentum, self.trust = params, wd, momentum, trust
        self.mu = [torch.zeros_like(p) for p in params]
        self.lr = 0.0

    @torch.no_grad()
    def step(self) -> None:
        for p, mu in zip(self.params, self.mu, strict=True):
            d = p.grad.clone()
            if p.ndim > 1:
                d = d + self.wd * p
                pn, dn = p.norm().item(), d.norm().item()
                d = d * (self.trust * pn / dn if pn > 0 and dn > 0 else 1.0)
            mu.mul_(self.momentum).add_(d)
            p.sub_(self.lr * mu)


class Oracle:
    """base/momentum encoders map images to projector outputs; predictor maps those to q."""

    def __init__(self, base: nn.Module, momentum: nn.Module, predictor: nn.Module, *, T: float, optimizer: str,
                 base_lr: float, wd: float, batch: int, epochs: int, warmup: float, m0: float, m_cos: bool,
                 iters_per_epoch: int) -> None:
        self.base, self.momentum, self.predictor = plain_copy(base), plain_copy(momentum), plain_copy(predictor)
        for mod in (self.base, self.momentum, self.predictor):
            mod.train()
        self.T, self.base_lr, self.batch, self.epochs, self.warmup = T, base_lr, batch, epochs, warmup
        self.m0, self.m_cos, self.iters = m0, m_cos, iters_per_epoch
        params = [p for p in itertools.chain(self.base.parameters(), self.predictor.parameters()) if p.requires_grad]
        self.lars = optimizer == "lars"
        self.opt = OracleLARS(params, wd) if self.lars else torch.optim.AdamW(params, lr=0.0, weight_decay=wd)
        self.t = 0
        #: per step, the gradient norm of the first layer (ViT patch embedding / ResNet conv1), as the run logs it
        self.first_layer_grad_norms: list[dict[str, float]] = []

    def step(self, x1: torch.Tensor, x2: torch.Tensor) -> float:
        ep = self.t / self.iters
        lr = lr_at(ep, self.base_lr, self.batch, self.epochs, self.warmup)
        m = m_at(ep, self.m0, self.epochs, self.m_cos)
        with torch.no_grad():
            for pb, pm in zip(self.base.parameters(), self.momentum.parameters(), strict=True):
                pm.mul_(m).add_(pb, alpha=1 - m)
        q1 = self.predictor(self.base(x1))
        q2 = self.predictor(self.base(x2))
        with torch.no_grad():
            k1, k2 = self.momentum(x1), self.momentum(x2)
        loss = infonce(q1, k2, self.T) + infonce(q2, k1, self.T)
        if self.lars:
            for p in self.opt.params:
                p.grad = None
        else:
            self.opt.zero_grad()
        loss.backward()
        self.first_layer_grad_norms.append({n: p.grad.norm().item() for n, p in self.base.named_parameters()
                                            if n in ("patch_embed.proj.weight", "conv1.weight") and p.grad is not None})
        if self.lars:
            self.opt.lr = lr
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr
        self.opt.step()
        self.t += 1
        return loss.item()

    def train(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        return [self.step(x1, x2) for x1, x2 in batches]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for prefix, mod in (("base_encoder", self.base), ("momentum_encoder", self.momentum),
                            ("predictor", self.predictor)):
            out.update({f"{prefix}.{k}": v for k, v in mod.state_dict().items()})
        return out
