"""BatchNorm synchronised across ranks, on gloo (CPU) as well as NCCL.

torch.nn.SyncBatchNorm refuses CPU tensors in training, and MoCo v3 syncs every
BN layer (backbone, projector, predictor, both encoders). Each rank computes its
count, mean and sum of squared deviations; one differentiable all_gather combines
them (Chan et al.'s parallel variance), so the statistics are those of the global batch and the
gradient flows back to every rank's inputs.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d; plain BatchNorm when there is one rank or in eval mode."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1,
                 affine: bool = True, track_running_stats: bool = True, process_group=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats)
        self.process_group = process_group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects (N, C, ...) input, got shape {tuple(x.shape)}")

    def _world(self) -> int:
        if not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size(self.process_group)

    def _momentum_factor(self) -> float:
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:
                return 1.0 / float(self.num_batches_tracked)
        return 0.0 if self.momentum is None else self.momentum

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats or self._world() == 1:
            # fp32 at least: a sharding engine may hand in 16-bit inputs and weights, the
            # running statistics stay fp32
            xf = x.to(torch.promote_types(x.dtype, torch.float32))
            factor = self._momentum_factor() if self.training else 0.0
            return F.batch_norm(
                xf, self.running_mean if not self.training or self.track_running_stats else None,
                self.running_var if not self.training or self.track_running_stats else None,
                None if self.weight is None else self.weight.to(xf.dtype),
                None if self.bias is None else self.bias.to(xf.dtype), use_batch_stats, factor, self.eps).to(x.dtype)
        return self._global_batch_norm(x)

    def _global_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        count = torch.full((1,), x.numel() // x.shape[1], dtype=xf.dtype, device=x.device)
        mean = xf.mean(dims)
        m2 = (xf - mean.view(shape)).square().sum(dims)
        local = torch.cat([count, mean, m2])
        # the functional all_gather carries the gradient back to every rank (reduce-scatter of grads)
        stats = funcol.all_gather_single(local.unsqueeze(0), 0, self.process_group or dist.group.WORLD)
        counts, means, m2s = stats[:, :1], stats[:, 1:1 + x.shape[1]], stats[:, 1 + x.shape[1]:]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total
        g_m2 = m2s.sum(0) + (counts * (means - g_mean).square()).sum(0)
        var = g_m2 / total
        factor = self._momentum_factor()
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.lerp_(g_mean.detach().to(self.running_mean.dtype), factor)
                unbiased = g_m2.detach() / (total.detach() - 1).clamp(min=1)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        y = (xf - g_mean.view(shape)) * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.to(xf.dtype).view(shape) + self.bias.to(xf.dtype).view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Replace every torch BatchNorm in `module` by SyncBatchNorm, keeping values and key names."""
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        new = SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                            module.track_running_stats)
        like = next(iter(module.parameters()), None) if module.running_mean is None else module.running_mean
        if like is not None:
            new.to(device=like.device, dtype=like.dtype)
        new.load_state_dict(module.state_dict())
        for name, param in module.named_parameters(recurse=False):
            getattr(new, name).requires_grad_(param.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new_child = convert_sync_batchnorm(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def has_batchnorm(module: nn.Module) -> bool:
    return any(isinstance(m, _BatchNorm) for m in module.modules())
