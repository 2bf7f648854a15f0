"""DeepSpeed ZeRO stages 0-3, configured by a genuine DeepSpeed JSON.

The whole MoCo module goes to one `deepspeed.initialize`, so ZeRO-3 partitions the momentum
encoder exactly like the base encoder (flat ceil(numel / world) slices per parameter). In 16-bit
modes DeepSpeed casts the module, so the momentum encoder keeps its own fp32 values, laid out
like the optimizer's fp32 masters, and is updated from those masters (an EMA with 1 - m <= 0.01
stored in bf16 rounds away):

- ZeRO-3: one fp32 partition per parameter, lerped against `safe_get_local_fp32_param`, then
  copied into the momentum parameter's 16-bit partition: local, no communication.
- ZeRO 1-2 in 16 bits: one fp32 fragment per parameter slice this rank's optimizer owns, lerped
  locally, then one all-reduce of a 16-bit buffer rebuilds the replicated momentum weights
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
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from moco_scale.checkpoint import load_checkpoint
from moco_scale.config import ConfigError, validate
from moco_scale.dist import DistContext
from moco_scale.engines.activation_checkpointing import apply_activation_checkpointing
from moco_scale.engines.base import Engine, resolve_precision
from moco_scale.models import MoCo
from moco_scale.models.chunking import PhasedChunks
from moco_scale.optim import build_optimizer

#: moco-scale's own keys, in a "moco_scale" section that is removed before DeepSpeed reads the file
MOCO_SCALE_DEFAULTS: dict[str, Any] = {"activation_checkpointing": 0, "backbone_chunk": 0}
_DS_TAG = "deepspeed"  # the subfolder DeepSpeed writes its checkpoint into
UNIVERSAL_TAG = "universal"  # where `moco-scale convert --to universal` puts ds_to_universal's output
_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_deepspeed_config(raw: dict[str, Any], source: str, global_batch: int | None,
                             world: int) -> dict[str, Any]:
    """The engine config for a DeepSpeed JSON: its "auto" batch fields filled from -b and the world
    size (numbers must agree with them), clipping off unless asked for, moco-scale's section split off."""
    cfg = copy.deepcopy(raw)
    ours = validate(cfg.pop("moco_scale", {}), MOCO_SCALE_DEFAULTS, {}, f"engine config {source}: section 'moco_scale'")
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
    return {"engine": "deepspeed", "zero_stage": stage, **ours, "deepspeed": cfg}


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


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    DEFAULTS = {"engine": "deepspeed", "zero_stage": 0, **MOCO_SCALE_DEFAULTS, "deepspeed": {}}
    needs_process_group = True

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
            self._chunks = PhasedChunks(lambda *inputs, part: self.ds(*inputs, part=part), config["backbone_chunk"])
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
        momentum_init = [m.detach().float().cpu().clone() for m, b in zip(
            model.momentum_encoder.parameters(), model.base_encoder.parameters(), strict=True) if b.requires_grad]
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
        self._pairs = [(m, b) for m, b in zip(model.momentum_encoder.parameters(), model.base_encoder.parameters(),
                                               strict=True) if b.requires_grad]
        self._momentum_names = [name for (name, _), b in zip(model.momentum_encoder.named_parameters(),
                                                             model.base_encoder.parameters(), strict=True)
                                if b.requires_grad]
        self._init_momentum_state()
        self._set_momentum(momentum_init)

    # -- momentum encoder -------------------------------------------------------------------------
    def _init_momentum_state(self) -> None:
        from deepspeed.utils import safe_get_local_fp32_param

        if self.stage == 3:
            self._mode = "partition"
            # the fp32 state sits beside the fp32 masters it is lerped against (on the CPU under optimizer offload);
            # the momentum parameter's own partition serves where it already is that (fp32, same device)
            masters = [safe_get_local_fp32_param(b) for _, b in self._pairs]
            self._m32 = [m.ds_tensor if (m.ds_tensor.dtype, m.ds_tensor.device) == (t.dtype, t.device)
                         else t.detach().clone() for (m, _), t in zip(self._pairs, masters, strict=True)]
            copies = [(p.ds_tensor, s) for (p, _), s in zip(self._pairs, self._m32, strict=True)
                      if p.ds_tensor is not s]
            self._to_partitions = BatchedCopy([d for d, _ in copies], [s for _, s in copies]) if copies else None
            self._gather_stream = _zero3_gather_stream(self._ds_optimizer)
        elif self._dtype is None:
            self._mode = "replicated"
        elif self.stage == 0:
            self._mode = "master_copy"
            self._master_by_id = self._master_views()
            self._masters = [self._master_by_id[id(b)] for _, b in self._pairs]
            self._m32 = [t.detach().clone() for t in self._masters]
        else:
            self._mode = "fragments"
            self._offsets = list(itertools.accumulate((b.numel() for _, b in self._pairs), initial=0))
            self._m32 = [None if b._hp_mapping is None else b._hp_mapping.get_hp_fragment().detach().clone()
                         for _, b in self._pairs]

    def _master_views(self) -> dict[int, torch.Tensor]:
        """Per-parameter fp32 masters of DeepSpeed's ZeRO-0 16-bit optimizer (fused: flat; unfused: a list)."""
        opt = self._ds_optimizer
        views: dict[int, torch.Tensor] = {}
        if hasattr(opt, "fp32_groups_flat"):
            for params, flat in zip(opt.fp16_groups, opt.fp32_groups_flat, strict=True):
                offsets = itertools.accumulate((p.numel() for p in params), initial=0)
                views.update({id(p): flat.narrow(0, o, p.numel()).view_as(p)
                              for p, o in zip(params, offsets, strict=False)})
        else:
            for params, masters in zip(opt.fp16_groups, opt.fp32_groups, strict=True):
                views.update({id(p): t.view_as(p) for p, t in zip(params, masters, strict=True)})
        return views

    def _owned(self) -> list[tuple[int, torch.Tensor, torch.Tensor]]:
        """(pair index, momentum fp32 fragment, base fp32 master fragment) for the slices this rank owns."""
        return [(i, s, b._hp_mapping.get_hp_fragment())
                for i, (s, (_, b)) in enumerate(zip(self._m32, self._pairs, strict=True)) if s is not None]

    def _assemble(self, dtype: torch.dtype) -> torch.Tensor:
        """The full momentum parameters as one flat buffer: each rank fills its fragments, one all-reduce."""
        buf = torch.zeros(self._offsets[-1], dtype=dtype, device=self.ctx.device)
        for i, state, _ in self._owned():
            addr = self._pairs[i][1]._hp_mapping.lp_fragment_address
            buf.narrow(0, self._offsets[i] + addr.start, addr.numel).copy_(state.view(-1))
        dist.all_reduce(buf)
        return buf

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        if self._mode == "replicated":
            torch._foreach_lerp_([p for p, _ in self._pairs], [p for _, p in self._pairs], 1.0 - m)
        elif self._mode == "master_copy":
            torch._foreach_lerp_(self._m32, self._masters, 1.0 - m)
            torch._foreach_copy_([p for p, _ in self._pairs], self._m32)
        elif self._mode == "partition":
            from deepspeed.utils import safe_get_local_fp32_param

            masters = [safe_get_local_fp32_param(b) for _, b in self._pairs]
            torch._foreach_lerp_(self._m32, masters, 1.0 - m)
            if self._to_partitions is not None:
                self._to_partitions.run()
            if self._gather_stream is not None:
                # DeepSpeed all-gathers partitions on its own stream without waiting for the default one, where
                # the values above were written: without this wait the forward could gather last step's values
                self._gather_stream.wait_stream(torch.cuda.current_stream())
        else:
            owned = self._owned()
            if owned:
                torch._foreach_lerp_([s for _, s, _ in owned], [h for _, _, h in owned], 1.0 - m)
            buf = self._assemble(self._dtype)
            for (p, _), start in zip(self._pairs, self._offsets, strict=False):
                p.copy_(buf.narrow(0, start, p.numel()).view_as(p))

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
        if self._mode == "master_copy":
            return self._master_by_id[id(p)].detach()
        return safe_get_full_fp32_param(p)

    def _full_momentum(self) -> list[torch.Tensor]:
        if self._mode == "replicated":
            return [p.detach() for p, _ in self._pairs]
        if self._mode == "master_copy":
            return [s.detach() for s in self._m32]
        if self._mode == "fragments":
            buf = self._assemble(torch.float32)
            return [buf.narrow(0, start, p.numel()).view_as(p) for (p, _), start in
                    zip(self._pairs, self._offsets, strict=False)]
        out = []
        for (p, _), s in zip(self._pairs, self._m32, strict=True):
            gathered = torch.empty(s.numel() * self.ctx.world_size, dtype=torch.float32, device=self.ctx.device)
            dist.all_gather_single(gathered, s.detach().reshape(-1).to(self.ctx.device, torch.float32))
            out.append(gathered[:p.ds_numel].view(p.ds_shape))
        return out

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 masters of the base encoder and predictor, the fp32 momentum encoder, fp32 BN statistics."""
        params = dict(self.model.named_parameters())
        momentum = {id(p): t for (p, _), t in zip(self._pairs, self._full_momentum(), strict=True)}
        out = {}
        for name in self.model.state_dict():
            if name not in params:
                out[name] = self.model.get_buffer(name).detach()
            elif name in self._frozen:
                out[name] = self._frozen[name]
            elif name.startswith("momentum_encoder."):
                p = params[name]
                twin = "base_encoder." + name.removeprefix("momentum_encoder.")
                out[name] = momentum[id(p)] if id(p) in momentum else self._frozen[twin]
            else:
                out[name] = self._full_base(params[name])
        return out

    def optimizer_state_dict(self) -> dict[str, Any]:
        # DeepSpeed's optimizer state is partitioned; it is saved in DeepSpeed's own sharded
        # checkpoint format, not in the reference's single file
        return {"optimizer": None, "scaler": None}

    def save(self, path: str) -> None:
        """DeepSpeed's own sharded format under path/deepspeed, plus the fp32 momentum encoder in momentum.pt:
        DeepSpeed keeps no fp32 copy of it (in 16-bit modes its module weights are rounded)."""
        self.ds.save_checkpoint(path, tag=_DS_TAG, save_latest=False)
        momentum = [t.detach().to("cpu", copy=True) for t in self._full_momentum()]  # a collective
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
        self._set_momentum(saved["tensors"])
        with torch.no_grad():
            for name, value in saved.get("buffers", {}).items():
                buf = self.model.get_buffer(name)
                buf.copy_(value.to(buf.device, buf.dtype))

    @torch.no_grad()
    def _set_momentum(self, full: list[torch.Tensor]) -> None:
        """Place whole fp32 momentum parameters into this rank's layout (the inverse of _full_momentum)."""
        for i, ((p, b), t) in enumerate(zip(self._pairs, full, strict=True)):
            flat = t.reshape(-1).to(self.ctx.device, torch.float32)
            if self._mode == "partition":
                state = self._m32[i]
                start, n = self.ctx.rank * state.numel(), state.numel()
                part = torch.zeros(n, dtype=torch.float32, device=flat.device)
                avail = max(0, min(n, flat.numel() - start))
                part[:avail] = flat[start:start + avail]
                state.reshape(-1).copy_(part)
                if p.ds_tensor is not state:
                    p.ds_tensor.reshape(-1).copy_(part)
                continue
            p.copy_(flat.view_as(p))
            if self._mode == "master_copy":
                self._m32[i].copy_(flat.view_as(self._m32[i]))
            elif self._mode == "fragments" and self._m32[i] is not None:
                addr = b._hp_mapping.lp_fragment_address
                self._m32[i].reshape(-1).copy_(flat.narrow(0, addr.start, addr.numel))

    def close(self) -> None:
        """Measured on gloo: without this, ZeRO-2/3 ranks abort at interpreter exit in about a quarter of runs."""
        if self.ds is not None:
            self.ds.destroy()
        self.ds = self._ds_optimizer = self.optimizer = None
        self._m32, self._to_partitions = [], None
        gc.collect()
