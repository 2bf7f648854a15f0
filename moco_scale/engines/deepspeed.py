"""DeepSpeed ZeRO stages 0-3, configured by a genuine DeepSpeed JSON (read by engines/deepspeed_config.py).

The whole MoCo module goes to one `deepspeed.initialize`, so ZeRO-3 partitions the momentum
encoder exactly like the base encoder (flat ceil(numel / world) slices per parameter). The momentum
encoder's fp32 values live in one of four layouts that follow DeepSpeed's (engines/deepspeed_momentum.py).
"""

from __future__ import annotations

import copy
import gc
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from moco_scale.config import ConfigError
from moco_scale.dist import DistContext
from moco_scale.engines.activation_checkpointing import apply_activation_checkpointing
from moco_scale.engines.base import Engine
from moco_scale.engines.deepspeed_config import (
    BATCH_KEYS,
    MOCO_SCALE_DEFAULTS,
    requested_precision,
    resolve_config_precision,
)
from moco_scale.engines.deepspeed_momentum import momentum_layout, zero0_masters
from moco_scale.files import load_checkpoint
from moco_scale.models import MoCo
from moco_scale.models.chunking import PhasedChunks
from moco_scale.optim import build_optimizer

_DS_TAG = "deepspeed"  # the subfolder DeepSpeed writes its checkpoint into
UNIVERSAL_TAG = "universal"  # where `moco-scale convert --to universal` puts ds_to_universal's output


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
        if "auto" in (ds_cfg.get(k) for k in BATCH_KEYS):
            raise ConfigError("engine config: batch fields are still \"auto\"; load it with the global batch")
        self.precision = resolve_config_precision(ds_cfg, ctx.device)
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
        self._master_by_id = zero0_masters(self._ds_optimizer) if self.stage == 0 and self._dtype else {}
        self.momentum = momentum_layout(self._pairs, ctx, self._ds_optimizer, self.stage, self._dtype)
        with torch.no_grad():
            self.momentum.load(momentum_init)
        if self._chunks == "pending":
            self._chunks = PhasedChunks(_ThroughEngine(self.ds, model), config["backbone_chunk"])

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
