"""DeepSpeed ZeRO stages 0-3, configured by a genuine DeepSpeed JSON.

The whole MoCo module goes to one `deepspeed.initialize`, so ZeRO-3 partitions the momentum
encoder exactly like the base encoder (flat ceil(numel / world) slices per parameter). In 16-bit
modes DeepSpeed casts the module, so the momentum encoder keeps its own fp32 values, laid out
like the optimizer's fp32 masters, and is updated from those masters (an EMA with 1 - m <= 0.01
stored in bf16 rounds away):

- ZeRO-3: one fp32 partition per parameter, lerped against `safe_get_local_fp32_param`, then
  copied into the momentum parameter's 16-bit partition: local, no communication.
- ZeRO 1-2 in 16 bits: one fp32 fragment per parameter slice this rank's optimizer owns, lerped
  locally, then one all-gather of the 16-bit fragments rebuilds the replicated momentum weights
  (as ZeRO 1/2 all-gathers the base weights after each step).
- ZeRO 0 in 16 bits: DeepSpeed keeps whole fp32 masters on every rank; so does the momentum
  encoder: a local lerp, then a cast into the 16-bit weights.
- ZeRO 0-2 in fp32: the module parameters are the fp32 values; a local lerp, as in DDP.
"""

from __future__ import annotations

import copy
import gc
import itertools
import os
import shutil
import subprocess
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from moco_scale.config import ConfigError, validate
from moco_scale.dist import DistContext, all_gather_flat
from moco_scale.engines.activation_checkpointing import apply_activation_checkpointing
from moco_scale.engines.base import Engine, resolve_precision
from moco_scale.files import load_checkpoint
from moco_scale.models import MoCo
from moco_scale.models.chunking import PhasedChunks
from moco_scale.optim import build_optimizer

#: moco-scale's own keys, in a "moco_scale" section that is removed before DeepSpeed reads the file
MOCO_SCALE_DEFAULTS: dict[str, Any] = {"activation_checkpointing": 0, "backbone_chunk": 0, "compile": False}
_DS_TAG = "deepspeed"  # the subfolder DeepSpeed writes its checkpoint into
UNIVERSAL_TAG = "universal"  # where `moco-scale convert --to universal` puts ds_to_universal's output
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_deepspeed_config(raw: dict[str, Any], source: str, global_batch: int | None,
                             world: int) -> dict[str, Any]:
    """The engine config for a DeepSpeed JSON: its "auto" batch fields filled from -b and the world
    size (numbers must agree with them), clipping off unless asked for, moco-scale's section split off."""
    cfg = copy.deepcopy(raw)
    ours = validate(cfg.pop("moco_scale", {}), MOCO_SCALE_DEFAULTS, {}, f"engine config {source}: section 'moco_scale'")
    if ours["compile"] or "compile" in cfg:
        raise ConfigError(f"engine config {source}: compile is not offered under DeepSpeed: its compile path "
                          "(engine.compile()) compiles the whole engine-wrapped module, where ZeRO's parameter "
                          "hooks and moco-scale's momentum update in the partitions would run inside graphs that "
                          "have not been checked against the reference; compile per block with "
                          "ds_configs/ddp.json or ds_configs/fsdp.json and \"compile\": true, or remove the key")
    for key in ("optimizer", "scheduler"):
        if key in cfg:
            raise ConfigError(f"engine config {source}: remove the '{key}' section: the optimizer and its schedule "
                              "come from --optimizer, --lr, --wd, --epochs and --warmup-epochs, as in the reference")
    zero = cfg.get("zero_optimization", {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"engine config {source}: key 'zero_optimization.stage' must be 0, 1, 2 or 3, got {stage!r}")
    if stage == 3:
        # the momentum encoder is updated in its partitions; a parameter DeepSpeed keeps whole ("persisted",
        # its default below 1e5 elements) would never see the update in its forward
        persist = zero.setdefault("stage3_param_persistence_threshold", 0)
        if persist != 0:
            raise ConfigError(f"engine config {source}: key 'zero_optimization.stage3_param_persistence_threshold' "
                              f"must be 0 (got {persist}): moco-scale updates the momentum encoder in its ZeRO-3 "
                              "partitions, and a persisted parameter would not see the update")
    gas = cfg.get("gradient_accumulation_steps", "auto")
    if gas not in ("auto", 1):
        raise ConfigError(f"engine config {source}: key 'gradient_accumulation_steps' must be 1 or \"auto\", got "
                          f"{gas!r}: MoCo v3 takes its negatives from the whole global batch in one step, so "
                          "accumulation would change the loss")
    cfg["gradient_accumulation_steps"] = 1
    if global_batch is not None:
        want = {"train_batch_size": global_batch, "train_micro_batch_size_per_gpu": global_batch // world}
        for key, value in want.items():
            given = cfg.get(key, "auto")
            if given != "auto" and given != value:
                raise ConfigError(f"engine config {source}: key '{key}' is {given}, but -b {global_batch} over "
                                  f"{world} rank(s) gives {value}; set it to \"auto\" or {value}")
            cfg[key] = value
    # DeepSpeed clips at 1.0 unless told otherwise; the reference clips nothing
    cfg.setdefault("gradient_clipping", 0.0)
    unknown = unknown_top_level_keys(cfg)
    if unknown:
        import difflib

        known = sorted(_known_keys())
        hints = [f"{k!r}" + (f" (did you mean {close[0]!r}?)" if (close := difflib.get_close_matches(k, known, 1))
                             else "") for k in unknown]
        raise ConfigError(f"engine config {source}: unknown top-level key(s) {', '.join(hints)}: DeepSpeed "
                          "ignores keys it does not know, so a misspelled section would silently do nothing")
    return {"engine": "deepspeed", "zero_stage": stage, **ours, "deepspeed": cfg}


class _ReadKeys(dict):
    """A config dict that records which top-level keys DeepSpeed's parser asks for."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.read: set[str] = set()

    def get(self, key, *default):
        self.read.add(key)
        return super().get(key, *default)

    def __getitem__(self, key):
        self.read.add(key)
        return super().__getitem__(key)

    def __contains__(self, key) -> bool:
        self.read.add(key)
        return super().__contains__(key)


_KNOWN: set[str] = set()


def _known_keys() -> set[str]:
    """Top-level keys this DeepSpeed reads: those its config parser asks for, and the key names its config and
    constants modules define (sections it reads only when present, through `keys()`)."""
    if not _KNOWN:
        import importlib
        import pkgutil

        import deepspeed
        from deepspeed.runtime.config import DeepSpeedConfig

        probe = _ReadKeys({"train_batch_size": 1, "train_micro_batch_size_per_gpu": 1,
                           "gradient_accumulation_steps": 1})
        DeepSpeedConfig(probe)
        _KNOWN.update(probe.read)
        for info in pkgutil.walk_packages(deepspeed.__path__, "deepspeed."):
            if not info.name.endswith(("constants", ".config")) or ".ops" in info.name or "inference" in info.name:
                continue
            try:
                module = importlib.import_module(info.name)
            except Exception:  # noqa: BLE001 - an optional feature's module that needs what is not installed
                continue
            _KNOWN.update(v for k, v in vars(module).items() if k.isupper() and isinstance(v, str))
    return _KNOWN


def unknown_top_level_keys(cfg: dict[str, Any]) -> list[str]:
    """The keys of a DeepSpeed config that the installed DeepSpeed would never read (moco-scale checks them: it
    does not)."""
    return sorted(k for k in cfg if k not in _known_keys())


#: the reference's dynamic loss scaler (init 2^16, growth interval 2000), for an fp16 section "auto" turns on
_FP16_DEFAULTS = {"initial_scale_power": 16, "loss_scale_window": 2000}


def requested_precision(cfg: dict[str, Any]) -> str:
    """What a DeepSpeed config's bf16/fp16 sections ask for: "enabled": "auto" in either is "auto"."""
    bf16, fp16 = (cfg.get(k, {}).get("enabled", False) for k in ("bf16", "fp16"))
    if bf16 is True and fp16 is True:
        raise ConfigError("engine config: 'bf16' and 'fp16' cannot both be enabled")
    return "bf16" if bf16 is True else "fp16" if fp16 is True else "auto" if "auto" in (bf16, fp16) else "fp32"


def _resolve_precision(cfg: dict[str, Any], device: torch.device) -> str:
    """The engines' one rule (engines/base.py) for a DeepSpeed config; its sections are rewritten to say what
    was chosen."""
    requested = requested_precision(cfg)
    try:
        precision = resolve_precision(requested, device)
    except ValueError as e:
        raise ConfigError(f"engine config: {e}") from None
    cfg["bf16"] = {**cfg.get("bf16", {}), "enabled": precision == "bf16"}
    if precision == "fp16":
        cfg["fp16"] = {**_FP16_DEFAULTS, **cfg.get("fp16", {}), "enabled": True}
    elif "fp16" in cfg:
        cfg["fp16"] = {**cfg["fp16"], "enabled": False}
    return precision


def _unlink_shm_allreduce_buffer(rank: int) -> None:
    """Remove the name of DeepSpeed's CPU shared-memory all-reduce segment once every rank has mapped it.

    Under the ``deepspeed`` launcher on the CPU accelerator each rank creates a 66 MB
    ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<addr>_<port>_<rank>`` that DeepSpeed never unlinks, so every
    launch leaks it until /dev/shm (RAM) is full. ``deepspeed.initialize`` returns only after each rank has
    opened all peers' segments; after a barrier the names can go while the mappings stay valid to exit.
    """
    path = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
                               f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    if dist.is_initialized():
        dist.barrier()  # on every rank, so a missing file on one rank cannot leave the others waiting
    path.unlink(missing_ok=True)


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


def _zero0_masters(ds_optimizer: Any) -> dict[int, torch.Tensor]:
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


class _ThroughEngine:
    """The phase methods of MoCo (models/chunking.Phases) called through DeepSpeed's engine, whose forward runs
    ZeRO-3's start/end-of-forward hooks: the engine's module forwards to the phase for that one call."""

    def __init__(self, ds: Any, model: MoCo) -> None:
        self.ds, self.model = ds, model

    def _call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        self.model.forward = getattr(self.model, method)  # an instance attribute: nn.Module.__call__ finds it
        try:
            return self.ds(*inputs)
        finally:
            del self.model.forward

    def base_features(self, crops: torch.Tensor) -> torch.Tensor:
        return self._call("base_features", crops)

    def momentum_features(self, crops: torch.Tensor) -> torch.Tensor:
        return self._call("momentum_features", crops)

    def loss_from_features(self, features: torch.Tensor, momentum_features: torch.Tensor) -> torch.Tensor:
        return self._call("loss_from_features", features, momentum_features)


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    DEFAULTS = {"engine": "deepspeed", "zero_stage": 0, **MOCO_SCALE_DEFAULTS, "deepspeed": {}}
    needs_process_group = True

    # -- policy ---------------------------------------------------------------------------------------
    @classmethod
    def layout(cls, cfg: dict[str, Any]) -> str:
        return f"deepspeed ZeRO-{cfg['zero_stage']}"  # partitions differ per stage

    label = layout

    @classmethod
    def requested_precision(cls, cfg: dict[str, Any]) -> str:
        return requested_precision(cfg["deepspeed"])

    @classmethod
    def with_precision(cls, cfg: dict[str, Any], precision: str) -> dict[str, Any]:
        out = copy.deepcopy(cfg)
        ds = out["deepspeed"]
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": {"bf16": True, "auto": "auto"}.get(precision, False)}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
        return out

    @classmethod
    def resume_config(cls, cfg: dict[str, Any], meta: dict[str, Any], source: Path) -> dict[str, Any]:
        """A universal checkpoint (convert --to universal) loads at any world size within its stage group."""
        if not meta.get("universal"):
            return super().resume_config(cfg, meta, source)
        saved_stage3, stage3 = meta["engine"].endswith("ZeRO-3"), cfg["zero_stage"] == 3
        if saved_stage3 != stage3:  # measured with deepspeed 0.19.8: its model files are named per stage group
            raise ConfigError(f"--resume {source} is a universal checkpoint of {meta['engine']}; DeepSpeed loads it "
                              f"into {'ZeRO-3' if saved_stage3 else 'ZeRO 1-2'} only, and this run uses "
                              f"ZeRO-{cfg['zero_stage']}. Convert the original --to reference and --resume "
                              "that file instead (the optimizer starts fresh)")
        out = copy.deepcopy(cfg)
        out["deepspeed"].setdefault("checkpoint", {})["load_universal"] = True
        return out

    @classmethod
    def reads(cls, layout: str) -> bool:
        return layout.startswith("deepspeed ZeRO-")

    @classmethod
    def read_model_state(cls, folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
        """fp32 masters from DeepSpeed's partitions (zero_to_fp32), the fp32 momentum encoder from momentum.pt;
        no optimizer state (DeepSpeed's is partitioned)."""
        tag = folder / _DS_TAG
        if meta["engine"].endswith("ZeRO-0"):
            # no partitions: the module as DeepSpeed saved it (fp32 runs: exact; 16-bit runs: rounded weights)
            model = load_checkpoint(str(tag / "mp_rank_00_model_states.pt"))["module"]
        else:
            from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

            model = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=_DS_TAG)
        momentum = load_checkpoint(str(folder / "momentum.pt"))
        for name, tensor in zip(momentum["names"], momentum["tensors"], strict=True):
            model[f"momentum_encoder.{name}"] = tensor
        return dict(model), None

    @classmethod
    def write_universal(cls, src: Path, out: Path, meta: dict[str, Any]) -> str:
        """DeepSpeed's ds_to_universal of `src` into the new folder `out`, momentum.pt (fp32 momentum encoder, BN
        statistics) beside it: loadable at any world size within its stage group (ZeRO 1-2, or 3)."""
        if meta["engine"].endswith("ZeRO-0"):
            super().write_universal(src, out, meta)
        res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                              str(src / _DS_TAG), "--output_folder", str(out / UNIVERSAL_TAG),
                              "--inject_missing_state"],  # ZeRO 1-2: the Megatron-only client state it asks for
                             capture_output=True, text=True)
        if res.returncode != 0:
            raise ValueError(f"DeepSpeed's ds_to_universal failed on {src / _DS_TAG}:\n{res.stderr[-2000:]}")
        shutil.copy2(src / "momentum.pt", out / "momentum.pt")
        # measured with deepspeed 0.19.8: a universal checkpoint's model files are named per stage group
        return "ZeRO-3" if meta["engine"].endswith("ZeRO-3") else "ZeRO-1 or ZeRO-2"

    # -- building -------------------------------------------------------------------------------------
    def __init__(self, model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> None:
        import deepspeed

        self.ctx = ctx
        ds_cfg = copy.deepcopy(config["deepspeed"])
        if "auto" in (ds_cfg.get(k) for k in _BATCH_KEYS):
            raise ConfigError("engine config: batch fields are still \"auto\"; load it with the global batch")
        self.precision = _resolve_precision(ds_cfg, ctx.device)
        self.stage = config["zero_stage"]
        if optimizer == "lars" and (self.stage > 0 or self.precision != "fp32"):
            raise ConfigError(f"LARS needs the norm of whole parameters, but ZeRO stage {self.stage} "
                              f"({self.precision}) hands the optimizer flat partitions; use ZeRO stage 0 in fp32, "
                              "an FSDP config (ds_configs/fsdp.json), or --optimizer adamw")
        apply_activation_checkpointing(model, config["activation_checkpointing"])
        # ZeRO-3 gathers parameters per module by hooks: the phased form of chunking (models/chunking.py)
        self._chunks = None
        if self.stage == 3 and config["backbone_chunk"]:
            model.check_backbone_chunk(config["backbone_chunk"])
            self._chunks = "pending"  # built once DeepSpeed wraps the model, below
        else:
            model.set_backbone_chunk(config["backbone_chunk"])
        model.to(ctx.device)
        # fp32 values of frozen base/predictor parameters (fixed position embedding, stop-grad conv1):
        # DeepSpeed keeps no fp32 master of them, and they never change
        self._frozen = {n: p.detach().clone() for n, p in model.named_parameters()
                        if not p.requires_grad and not n.startswith("momentum_encoder.")}
        trainable = model.trainable_parameters()
        # the momentum encoder's own fp32 values (equal to the base at a fresh start, not on a resume from a
        # reference file): taken before DeepSpeed casts or partitions the module
        momentum_init = [m.detach().float().cpu().clone() for _, m, _ in model.momentum_pairs()]
        self.optimizer = build_optimizer(optimizer, trainable, weight_decay)
        # a plain process (no launcher) has a group of one but none of the variables DeepSpeed checks for
        for key, value in (("LOCAL_RANK", ctx.local_rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size)):
            os.environ.setdefault(key, str(value))
        self.ds, self._ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, model_parameters=trainable, config=ds_cfg,
            dist_init_required=False)
        _unlink_shm_allreduce_buffer(ctx.rank)
        self.model = model
        for bn in (m for m in model.modules() if isinstance(m, _BatchNorm)):  # statistics stay fp32
            for name in ("running_mean", "running_var"):
                buf = getattr(bn, name)
                if buf is not None and buf.dtype != torch.float32:
                    setattr(bn, name, buf.float())
        self._dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)
        pairs = model.momentum_pairs()
        self._pairs = [(m, b) for _, m, b in pairs]
        self._momentum_names = [name for name, _, _ in pairs]
        self._master_by_id = _zero0_masters(self._ds_optimizer) if self.stage == 0 and self._dtype else {}
        self.momentum = self._momentum_layout()
        with torch.no_grad():
            self.momentum.load(momentum_init)
        if self._chunks == "pending":
            self._chunks = PhasedChunks(_ThroughEngine(self.ds, model), config["backbone_chunk"])

    def _momentum_layout(self) -> Momentum:
        if self.stage == 3:
            return Partitions(self._pairs, self.ctx, self._ds_optimizer)
        if self._dtype is None:
            return Replicated(self._pairs, self.ctx)
        if self.stage == 0:
            return MasterCopy(self._pairs, self.ctx, self._master_by_id)
        return Fragments(self._pairs, self.ctx, self._dtype)

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        self.momentum.update(m)


    # -- training step ----------------------------------------------------------------------------
    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = x1.to(self.ctx.device, dtype=self._dtype, non_blocking=True)
        x2 = x2.to(self.ctx.device, dtype=self._dtype, non_blocking=True)
        return self.ds(x1, x2) if self._chunks is None else self._chunks.forward(x1, x2)

    def backward(self, loss: torch.Tensor) -> None:
        if self._chunks is None:
            self.ds.backward(loss)
            return
        scale = self._ds_optimizer.loss_scale if self.precision == "fp16" else 1.0
        self._chunks.backward(loss, self.ds.backward, self._first_chunk_overwrites, grad_scale=scale)

    def _first_chunk_overwrites(self, i: int, n: int) -> None:
        """ZeRO-3 overwrites its gradient partitions in the first backward after a step and adds in the next
        ones (it counts backward passes from the next forward on). The heads took that first backward; the
        backbone's first gradient comes with chunk 0, and must overwrite the last step's, not add to it."""
        if i == 0:
            if not hasattr(self._ds_optimizer, "_epilogue_ran_this_backward"):
                raise RuntimeError("this DeepSpeed version counts ZeRO-3 micro steps differently; chunking under "
                                   "ZeRO-3 needs deepspeed 0.19")
            self._ds_optimizer._epilogue_ran_this_backward = False

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        self.ds.step()

    def grad_norm(self, name: str) -> float:
        from deepspeed.utils import safe_get_full_grad

        p = self.model.get_parameter(name)
        grad = p.grad if self.stage == 0 and self._dtype is None else safe_get_full_grad(p)
        if grad is None:
            return 0.0
        norm = grad.float().norm().item()  # fp16: still multiplied by the loss scale, which step() divides out
        return norm / self._ds_optimizer.loss_scale if self.precision == "fp16" else norm

    # -- state --------------------------------------------------------------------------------------
    def _full_base(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master of a trainable base/predictor parameter (a collective in 16-bit or ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        if self.stage < 3 and self._dtype is None:
            return p.detach()
        if id(p) in self._master_by_id:
            return self._master_by_id[id(p)].detach()
        return safe_get_full_fp32_param(p)

    def _full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 tensor) for the model's state dict, one at a time: each may be a collective."""
        params = dict(self.model.named_parameters())
        momentum = dict(zip((f"momentum_encoder.{n}" for n in self._momentum_names), self.momentum.full(),
                            strict=False))  # a generator: each gathered when its name comes
        for name in self.model.state_dict():
            if name not in params:
                yield name, self.model.get_buffer(name).detach()
            elif name in self._frozen:
                yield name, self._frozen[name]
            elif name.startswith("momentum_encoder."):
                twin = "base_encoder." + name.removeprefix("momentum_encoder.")
                yield name, momentum[name] if name in momentum else self._frozen[twin]
            else:
                yield name, self._full_base(params[name])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 masters of the base encoder and predictor, the fp32 momentum encoder, fp32 BN statistics."""
        return dict(self._full_tensors())

    def reference_state(self) -> dict[str, Any] | None:
        """Gathered one tensor at a time, kept (on the CPU) by rank 0 only; DeepSpeed's optimizer state is
        partitioned, and stays in its own checkpoint format."""
        out = {}
        for name, t in self._full_tensors():
            if self.ctx.is_main:
                out[name] = t.detach().to("cpu", torch.float32 if t.is_floating_point() else t.dtype, copy=True)
        return {"state_dict": out, "optimizer": None, "scaler": None} if self.ctx.is_main else None

    def save(self, path: str) -> None:
        """DeepSpeed's own sharded format under path/deepspeed, plus the fp32 momentum encoder in momentum.pt:
        DeepSpeed keeps no fp32 copy of it (in 16-bit modes its module weights are rounded)."""
        self.ds.save_checkpoint(path, tag=_DS_TAG, save_latest=False)
        momentum = [t.detach().to("cpu", copy=True) for t in self.momentum.full()]  # a collective
        if self.ctx.is_main:  # BN statistics too: a universal checkpoint carries trainable parameters only
            buffers = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()}
            torch.save({"names": self._momentum_names, "tensors": momentum, "buffers": buffers},
                       os.path.join(path, "momentum.pt"))

    def load(self, path: str, saved_world_size: int) -> None:
        universal = self.ds.load_universal_checkpoint()
        if universal and not os.path.isdir(os.path.join(path, UNIVERSAL_TAG)):
            raise ConfigError(f"the engine config sets checkpoint.load_universal but {path} holds no "
                              f"{UNIVERSAL_TAG}/ folder; make one: moco-scale convert --to universal {path} OUT")
        if not universal and saved_world_size != self.ctx.world_size:
            raise ConfigError(
                f"checkpoint {path} was written by {saved_world_size} DeepSpeed ranks and this run has "
                f"{self.ctx.world_size}: DeepSpeed's partitions only load at the same world size. Either make a "
                f"universal checkpoint (moco-scale convert --to universal {path} OUT) and --resume OUT, optimizer "
                f"state included, or consolidate it (moco-scale convert --to reference {path} full.pth.tar) and "
                "--resume full.pth.tar (the optimizer starts fresh), or resume with the same number of ranks")
        tag = UNIVERSAL_TAG if universal else _DS_TAG
        loaded, _ = self.ds.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"checkpoint {path}: DeepSpeed found no state under {os.path.join(path, tag)}")
        saved = load_checkpoint(os.path.join(path, "momentum.pt"))
        if saved["names"] != self._momentum_names:
            raise ValueError(f"checkpoint {path}/momentum.pt holds another model's momentum encoder")
        with torch.no_grad():
            self.momentum.load(saved["tensors"])
            for name, value in saved.get("buffers", {}).items():
                buf = self.model.get_buffer(name)
                buf.copy_(value.to(buf.device, buf.dtype))

    def close(self) -> None:
        """Measured on gloo: without this, ZeRO-2/3 ranks abort at interpreter exit in about a quarter of runs."""
        if self.ds is not None:
            self.ds.destroy()
        self.ds = self._ds_optimizer = self.optimizer = None
        self.momentum = None
        gc.collect()
