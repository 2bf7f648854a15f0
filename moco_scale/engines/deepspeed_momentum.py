"""The momentum encoder's fp32 values in DeepSpeed's layouts, one class per layout.

In 16-bit modes DeepSpeed casts the module, so the momentum encoder keeps its own fp32 values, laid out
like the optimizer's fp32 masters, and is updated from those masters (an EMA with 1 - m <= 0.01
stored in bf16 rounds away):

- ZeRO-3 (`Partitions`): one fp32 partition per parameter, lerped against `safe_get_local_fp32_param`, then
  copied into the momentum parameter's 16-bit partition: local, no communication.
- ZeRO 1-2 in 16 bits (`Fragments`): one fp32 fragment per parameter slice this rank's optimizer owns, lerped
  locally, then one all-gather of the 16-bit fragments rebuilds the replicated momentum weights
  (as ZeRO 1/2 all-gathers the base weights after each step).
- ZeRO 0 in 16 bits (`MasterCopy`): DeepSpeed keeps whole fp32 masters on every rank; so does the momentum
  encoder: a local lerp, then a cast into the 16-bit weights.
- ZeRO 0-2 in fp32 (`Replicated`): the module parameters are the fp32 values; a local lerp, as in DDP.

These read DeepSpeed 0.19's optimizer internals (pinned in pyproject.toml); a changed layout fails loudly.
"""

from __future__ import annotations

import itertools
from abc import ABC, abstractmethod
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from moco_scale.dist import DistContext, all_gather_flat


def _zero3_gather_stream(ds_optimizer: Any) -> torch.cuda.Stream | None:
    """The stream ZeRO-3 all-gathers partitions on (None on a synchronised device: the CPU). Private to
    DeepSpeed 0.19 (pinned in pyproject.toml); a later layout fails here, loudly, not in a silent race."""
    offload = getattr(ds_optimizer, "parameter_offload", None)
    name = "_DeepSpeedZeRoOffload__allgather_stream"
    if offload is None or not hasattr(offload, name):
        raise RuntimeError("this DeepSpeed version keeps ZeRO-3's all-gather stream elsewhere; moco-scale orders its "
                           "momentum update before that stream reads the partitions, and needs deepspeed 0.19")
    return getattr(offload, name)


class BatchedCopy:
    """dst[i].copy_(src[i]) for many tensors as one transfer: where sources and destinations are on different
    devices (fp32 momentum state on the CPU, 16-bit or fp32 partitions on the GPU under optimizer offload), the
    sources are cast into one pinned host buffer, copied to the device in one non-blocking transfer, then
    scattered there; on one device, one multi-tensor copy."""

    def __init__(self, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
        self.dst, self.src = dst, src
        self.staged = any(d.device != s.device for d, s in zip(dst, src, strict=True))
        if not self.staged:
            return
        dtypes = {d.dtype for d in dst}
        if len(dtypes) != 1 or len({d.device for d in dst}) != 1:
            raise ValueError(f"BatchedCopy stages into one dtype on one device, got {dtypes}")
        sizes = [d.numel() for d in dst]
        dtype, device = dtypes.pop(), dst[0].device
        self.host = torch.empty(sum(sizes), dtype=dtype, pin_memory=device.type == "cuda")
        self.device_buf = torch.empty(sum(sizes), dtype=dtype, device=device)
        self.host_views = [v.view_as(s) for v, s in zip(self.host.split(sizes), src, strict=True)]
        self.device_views = [v.view_as(d) for v, d in zip(self.device_buf.split(sizes), dst, strict=True)]
        self.done: torch.cuda.Event | None = None

    @torch.no_grad()
    def run(self) -> None:
        if not self.staged:
            torch._foreach_copy_(self.dst, self.src)
            return
        if self.done is not None:
            self.done.synchronize()  # the last transfer has left the host buffer (long since, one step ago)
        torch._foreach_copy_(self.host_views, self.src)
        self.device_buf.copy_(self.host, non_blocking=True)
        torch._foreach_copy_(self.dst, self.device_views)
        if self.device_buf.device.type == "cuda":
            self.done = torch.cuda.Event()
            self.done.record()


def zero0_masters(ds_optimizer: Any) -> dict[int, torch.Tensor]:
    """Per-parameter fp32 masters of DeepSpeed's ZeRO-0 16-bit optimizer (fused: flat; unfused: a list)."""
    views: dict[int, torch.Tensor] = {}
    if hasattr(ds_optimizer, "fp32_groups_flat"):
        for params, flat in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups_flat, strict=True):
            offsets = itertools.accumulate((p.numel() for p in params), initial=0)
            views.update({id(p): flat.narrow(0, o, p.numel()).view_as(p)
                          for p, o in zip(params, offsets, strict=False)})
    else:
        for params, masters in zip(ds_optimizer.fp16_groups, ds_optimizer.fp32_groups, strict=True):
            views.update({id(p): t.view_as(p) for p, t in zip(params, masters, strict=True)})
    return views


class Momentum(ABC):
    """The momentum encoder's fp32 values in one of DeepSpeed's layouts, chosen once (`momentum_layout`).
    `pairs` are (momentum, base) parameters, as MoCo.momentum_pairs gives them."""

    def __init__(self, pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], ctx: DistContext) -> None:
        self.pairs, self.ctx = pairs, ctx

    @abstractmethod
    def update(self, m: float) -> None:
        """theta_m = m theta_m + (1 - m) theta_b in fp32, and the module's momentum weights follow."""

    @abstractmethod
    def full(self) -> Iterator[torch.Tensor]:
        """The whole fp32 momentum parameters, one at a time, in `pairs` order (a collective where sharded:
        consume it on every rank)."""

    @abstractmethod
    def load(self, full: list[torch.Tensor]) -> None:
        """Place whole fp32 momentum parameters into this layout (the inverse of `full`)."""


class Replicated(Momentum):
    """fp32, ZeRO 0-2: the module's parameters are the fp32 values on every rank; a local lerp, as in DDP."""

    def update(self, m: float) -> None:
        torch._foreach_lerp_([p for p, _ in self.pairs], [b for _, b in self.pairs], 1.0 - m)

    def full(self) -> Iterator[torch.Tensor]:
        return (p.detach() for p, _ in self.pairs)

    def load(self, full: list[torch.Tensor]) -> None:
        for (p, _), t in zip(self.pairs, full, strict=True):
            p.copy_(t.reshape(p.shape).to(p.device, p.dtype))


class MasterCopy(Momentum):
    """16-bit ZeRO-0: DeepSpeed keeps whole fp32 masters on every rank, so does the momentum encoder; a local
    lerp against the masters, then a cast into the 16-bit weights."""

    def __init__(self, pairs, ctx, masters: dict[int, torch.Tensor]) -> None:
        super().__init__(pairs, ctx)
        self.masters = [masters[id(b)] for _, b in pairs]
        self.m32 = [t.detach().clone() for t in self.masters]

    def update(self, m: float) -> None:
        torch._foreach_lerp_(self.m32, self.masters, 1.0 - m)
        torch._foreach_copy_([p for p, _ in self.pairs], self.m32)

    def full(self) -> Iterator[torch.Tensor]:
        return (s.detach() for s in self.m32)

    def load(self, full: list[torch.Tensor]) -> None:
        for (p, _), s, t in zip(self.pairs, self.m32, full, strict=True):
            s.copy_(t.reshape(s.shape).to(s.device, torch.float32))
            p.copy_(s)


class Fragments(Momentum):
    """16-bit ZeRO 1-2: one fp32 fragment per parameter slice this rank's optimizer owns, lerped against the
    master fragment; then one all-gather of every rank's fragments (16-bit) rebuilds the replicated momentum
    weights, as ZeRO 1/2 all-gathers the base weights after each step: half the bytes of an all-reduce of a
    full buffer. Which rank owns which slices is exchanged once, here."""

    def __init__(self, pairs, ctx, dtype: torch.dtype) -> None:
        super().__init__(pairs, ctx)
        self.dtype = dtype
        self.m32, mine = [], []
        for i, (_, b) in enumerate(pairs):
            if b._hp_mapping is not None:
                addr = b._hp_mapping.lp_fragment_address
                self.m32.append(b._hp_mapping.get_hp_fragment().detach().clone())
                mine.append((i, addr.start, addr.numel))
        owners = [mine]
        if ctx.is_distributed and ctx.world_size > 1:
            owners = [None] * ctx.world_size
            dist.all_gather_object(owners, mine)
        self.slot = max(sum(n for _, _, n in frags) for frags in owners)  # each rank's share of the gather
        #: per pair: (offset in the gathered buffer, start in the parameter, length) of each of its fragments
        self.pieces: list[list[tuple[int, int, int]]] = [[] for _ in pairs]
        for r, frags in enumerate(owners):
            offset = r * self.slot
            for i, start, n in frags:
                self.pieces[i].append((offset, start, n))
                offset += n
        self.sizes = [n for _, _, n in mine]

    def _gather(self, dtype: torch.dtype) -> torch.Tensor:
        """Every rank's fragments side by side: one all-gather (world x slot elements)."""
        local = torch.zeros(self.slot, dtype=dtype, device=self.ctx.device)
        if self.m32:
            torch._foreach_copy_(list(local[:sum(self.sizes)].split(self.sizes)), [s.view(-1) for s in self.m32])
        if self.ctx.world_size == 1:
            return local
        out = torch.empty(self.slot * self.ctx.world_size, dtype=dtype, device=self.ctx.device)
        all_gather_flat(out, local)
        return out

    def update(self, m: float) -> None:
        if self.m32:  # the masters asked for each time: DeepSpeed relinks its fragments when it loads a checkpoint
            masters = [b._hp_mapping.get_hp_fragment() for _, b in self.pairs if b._hp_mapping is not None]
            torch._foreach_lerp_(self.m32, masters, 1.0 - m)
        buf = self._gather(self.dtype)
        dst, src = [], []
        for (p, _), pieces in zip(self.pairs, self.pieces, strict=True):
            for offset, start, n in pieces:
                dst.append(p.view(-1).narrow(0, start, n))
                src.append(buf.narrow(0, offset, n))
        torch._foreach_copy_(dst, src)

    def full(self) -> Iterator[torch.Tensor]:
        buf = self._gather(torch.float32)  # the module holds the whole 16-bit encoder anyway: twice its size
        for (p, _), pieces in zip(self.pairs, self.pieces, strict=True):
            whole = torch.empty(p.numel(), dtype=torch.float32, device=buf.device)
            for offset, start, n in pieces:
                whole.narrow(0, start, n).copy_(buf.narrow(0, offset, n))
            yield whole.view_as(p)

    def load(self, full: list[torch.Tensor]) -> None:
        owned = iter(self.m32)
        for (p, b), t in zip(self.pairs, full, strict=True):
            flat = t.reshape(-1).to(self.ctx.device, torch.float32)
            p.copy_(flat.view_as(p))
            if b._hp_mapping is not None:
                addr = b._hp_mapping.lp_fragment_address
                next(owned).reshape(-1).copy_(flat.narrow(0, addr.start, addr.numel))


class Partitions(Momentum):
    """ZeRO-3: one fp32 partition per parameter, lerped against `safe_get_local_fp32_param` (beside the fp32
    masters: on the CPU under optimizer offload), then copied into the momentum parameter's own partition:
    local, no communication. Where that partition is itself the fp32 state (fp32, same device), it is the state."""

    def __init__(self, pairs, ctx, ds_optimizer: Any) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        super().__init__(pairs, ctx)
        masters = [safe_get_local_fp32_param(b) for _, b in pairs]
        self.m32 = [m.ds_tensor if (m.ds_tensor.dtype, m.ds_tensor.device) == (t.dtype, t.device)
                    else t.detach().clone() for (m, _), t in zip(pairs, masters, strict=True)]
        copies = [(p.ds_tensor, s) for (p, _), s in zip(pairs, self.m32, strict=True) if p.ds_tensor is not s]
        self.to_partitions = BatchedCopy([d for d, _ in copies], [s for _, s in copies]) if copies else None
        self.gather_stream = _zero3_gather_stream(ds_optimizer)

    def update(self, m: float) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        torch._foreach_lerp_(self.m32, [safe_get_local_fp32_param(b) for _, b in self.pairs], 1.0 - m)
        if self.to_partitions is not None:
            self.to_partitions.run()
        if self.gather_stream is not None:
            # DeepSpeed all-gathers partitions on its own stream without waiting for the default one, where the
            # values above were written: without this wait the forward could gather last step's values
            self.gather_stream.wait_stream(torch.cuda.current_stream())

    def full(self) -> Iterator[torch.Tensor]:
        for (p, _), s in zip(self.pairs, self.m32, strict=True):
            gathered = torch.empty(s.numel() * self.ctx.world_size, dtype=torch.float32, device=self.ctx.device)
            all_gather_flat(gathered, s.detach().reshape(-1).to(self.ctx.device, torch.float32))
            yield gathered[:p.ds_numel].view(p.ds_shape)

    def load(self, full: list[torch.Tensor]) -> None:
        for (p, _), s, t in zip(self.pairs, self.m32, full, strict=True):
            flat = t.reshape(-1).to(self.ctx.device, torch.float32)
            start, n = self.ctx.rank * s.numel(), s.numel()
            part = torch.zeros(n, dtype=torch.float32, device=flat.device)
            avail = max(0, min(n, flat.numel() - start))
            part[:avail] = flat[start:start + avail]
            s.reshape(-1).copy_(part)
            if p.ds_tensor is not s:
                p.ds_tensor.reshape(-1).copy_(part)


def momentum_layout(pairs: list[tuple[torch.nn.Parameter, torch.nn.Parameter]], ctx: DistContext, ds_optimizer: Any,
                    stage: int, dtype: torch.dtype | None) -> Momentum:
    """The layout for a ZeRO stage and 16-bit dtype (None: fp32), after `deepspeed.initialize`."""
    if stage == 3:
        return Partitions(pairs, ctx, ds_optimizer)
    if dtype is None:
        return Replicated(pairs, ctx)
    if stage == 0:
        return MasterCopy(pairs, ctx, zero0_masters(ds_optimizer))
    return Fragments(pairs, ctx, dtype)
