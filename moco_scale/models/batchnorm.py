"""BatchNorm synchronised across ranks, one implementation for NCCL and gloo.

MoCo v3 syncs every BN layer (backbone, projector, predictor, both encoders). Each rank computes its count,
mean and sum of squared deviations in fp32 and one differentiable all_gather combines them (Chan et al.'s
parallel variance): the statistics are those of the global batch, and the gradient flows back to every rank's
inputs. torch's SyncBatchNorm function is not used on CUDA: it masks the gathered counts (`count_all[mask]`),
which waits for the device at every BN call (16 per ViT step, ~220 per ResNet-50 step), and moco-scale's ranks
hold equal batches, where the mask is never needed. With one rank, or in eval mode, it is a plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class SyncBatchNorm(_BatchNorm):
    """Drop-in for BatchNorm1d/2d/3d with torch's SyncBatchNorm semantics on every device.

    Not a subclass of torch.nn.SyncBatchNorm: DDP refuses modules holding one on CPU."""

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
        world = self._world()
        if use_batch_stats and world > 1:
            return self._synced_batch_norm(x)
        return self._local_batch_norm(x, use_batch_stats)

    def _local_batch_norm(self, x: torch.Tensor, use_batch_stats: bool) -> torch.Tensor:
        """One rank's BatchNorm. A 16-bit input stays 16-bit (torch's kernels accumulate in fp32); weights a
        sharding engine cast to 16 bits are brought to the fp32 of the running statistics (the mixed-type
        kernel), which stay fp32."""
        running = self.running_mean if not self.training or self.track_running_stats else None
        running_var = self.running_var if running is not None else None
        dtype = running.dtype if running is not None else torch.promote_types(x.dtype, torch.float32)
        weight = None if self.weight is None else self.weight.to(dtype)
        bias = None if self.bias is None else self.bias.to(dtype)
        factor = self._momentum_factor() if self.training else 0.0
        return F.batch_norm(x, running, running_var, weight, bias, use_batch_stats, factor, self.eps)

    def _synced_batch_norm(self, x: torch.Tensor) -> torch.Tensor:
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in fp32 at least
        count = torch.full((1,), x.numel() // x.shape[1], dtype=xf.dtype, device=x.device)
        mean = xf.mean(dims)
        m2 = (xf - mean.view(shape)).square().sum(dims)
        local = torch.cat([count, mean, m2])
        # the autograd all_gather carries the gradient back to every rank (a reduce-scatter of the gradients)
        stats = torch.stack(dist_fn.all_gather(local, group=self.process_group or dist.group.WORLD))
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
