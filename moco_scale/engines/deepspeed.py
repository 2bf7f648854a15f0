"""DeepSpeed ZeRO stages 0-3, configured by a genuine DeepSpeed JSON (read by engines/deepspeed_config.py).

The whole model goes to one `deepspeed.initialize`, so ZeRO-3 partitions the momentum encoder exactly
like the base encoder (flat ceil(numel / world) slices per parameter). A model on the meta device is
placed one unit at a time and partitioned before the next (ZeRO-3), or whole (ZeRO 0-2, replicated anyway).
The momentum encoder's fp32 values live in one of four layouts that follow DeepSpeed's
(engines/deepspeed_momentum.py), filled per shard.
"""

from __future__ import annotations

import copy
import gc
import math
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

from moco_scale.checkpoint.io import load_checkpoint
from moco_scale.config import ConfigError
from moco_scale.dist import DistContext, all_gather_flat
from moco_scale.engines.base import DTYPES, Engine
from moco_scale.engines.config import DeepSpeedConfig
from moco_scale.engines.deepspeed_checkpoint import DS_TAG, MOMENTUM_FILE, UNIVERSAL_TAG
from moco_scale.engines.deepspeed_config import BATCH_KEYS, resolve_config_precision
from moco_scale.engines.deepspeed_momentum import momentum_layout, zero0_masters
from moco_scale.engines.extensions import explain_build_wait
from moco_scale.engines.memory import Shapes, numel, optimizer_state, ring, z3_part
from moco_scale.engines.prepare import materialize_units, materialize_whole, prepare, take_state
from moco_scale.models.chunking import PhasedChunks
from moco_scale.models.init import InitialState
from moco_scale.models.parts import TrainModule
from moco_scale.optim import OptimizerSpec


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
    """A model method (the chunked step's phases, an evaluation's features) called through DeepSpeed's engine,
    whose forward runs ZeRO-3's start/end-of-forward hooks: the module forwards to the method for that call."""

    def __init__(self, ds: Any, model: TrainModule) -> None:
        self.ds, self.model = ds, model

    def call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        self.model.forward = getattr(self.model, method)  # an instance attribute: nn.Module.__call__ finds it
        try:
            return self.ds(*inputs)
        finally:
            del self.model.forward

    def base_features(self, crops: torch.Tensor) -> torch.Tensor:
        return self.call("base_features", crops)

    def momentum_features(self, crops: torch.Tensor) -> torch.Tensor:
        return self.call("momentum_features", crops)

    def loss_from_features(self, features: torch.Tensor, momentum_features: torch.Tensor) -> torch.Tensor:
        return self.call("loss_from_features", features, momentum_features)


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def __init__(self, model: TrainModule, optimizer: OptimizerSpec, config: DeepSpeedConfig, ctx: DistContext,
                 initial: InitialState | None = None) -> None:
        import deepspeed

        self.ctx, self.model = ctx, model
        ds_cfg = copy.deepcopy(config.deepspeed)
        if "auto" in (ds_cfg.get(k) for k in BATCH_KEYS):
            raise ConfigError("engine config: batch fields are still \"auto\"; load it with the global batch")
        self.precision = resolve_config_precision(ds_cfg, ctx.device)
        self.stage = config.zero_stage
        config.check(True, optimizer.name, self.precision)  # the optimizer against the layout (pretrain's check)
        self._dtype = self.input_dtype = DTYPES[self.precision] if self.precision != "fp32" else None
        # a plain process (no launcher) has a group of one but none of the variables DeepSpeed checks for
        for key, value in (("LOCAL_RANK", ctx.local_rank), ("RANK", ctx.rank), ("WORLD_SIZE", ctx.world_size)):
            os.environ.setdefault(key, str(value))
        # DeepSpeed's comm on this process group, before zero.Init reads the world size from it (below)
        with explain_build_wait(rank=ctx.rank):  # it builds DeepSpeed's CPU communication op
            deepspeed.init_distributed(dist_backend=dist.get_backend(), auto_mpi_discovery=False)
        state = take_state(model, initial)
        # ZeRO-3 gathers parameters per module by hooks: the phased form of chunking (models/chunking.py)
        prepare(model, config, phased_chunks=self.stage == 3, shard=lambda: self._place(model, state, ds_cfg))
        # fp32 values of frozen base/predictor parameters (fixed position embedding, stop-grad conv1): DeepSpeed
        # keeps no fp32 master of them and casts the module; this rank's partition of each under ZeRO-3
        self._frozen = {n: self._mine(state.tensor(n)) for n, p in model.named_parameters()
                        if not p.requires_grad and not n.startswith("momentum_encoder.")}
        trainable = model.trainable_parameters()
        self.optimizer = optimizer.build(model)
        self.ds, self._ds_optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=self.optimizer, model_parameters=trainable, config=ds_cfg,
            dist_init_required=False)
        _unlink_shm_allreduce_buffer(ctx.rank)
        for bn in (m for m in model.modules() if isinstance(m, _BatchNorm)):  # statistics stay fp32
            for name in ("running_mean", "running_var"):
                buf = getattr(bn, name)
                if buf is not None and buf.dtype != torch.float32:
                    setattr(bn, name, buf.float())
        pairs = model.momentum_pairs()
        self._pairs = [(m, b) for _, m, b in pairs]
        self._momentum_names = [name for name, _, _ in pairs]
        self._master_by_id = zero0_masters(self._ds_optimizer) if self.stage == 0 and self._dtype else {}
        self.momentum = momentum_layout(self._pairs, ctx, self._ds_optimizer, self.stage, self._dtype)
        with torch.no_grad():  # the momentum encoder's own fp32 values, one tensor at a time
            self.momentum.load(state.tensor(f"momentum_encoder.{n}") for n in self._momentum_names)
        self._through = _ThroughEngine(self.ds, model)
        self._chunks = PhasedChunks(self._through, config.backbone_chunk) if self.stage == 3 and \
            config.backbone_chunk else None

    def _place(self, model: TrainModule, state: InitialState, ds_cfg: dict[str, Any]) -> None:
        """ZeRO-3: one unit at a time, in the module's dtype, partitioned as if built under zero.Init (what
        deepspeed.initialize expects of such a model); ZeRO 0-2: the whole fp32 model, cast by DeepSpeed."""
        if self.stage < 3:
            materialize_whole(model, state, self.ctx.device)
            return
        import deepspeed

        materialize_units(model, state, self.ctx.device, self._dtype,
                          lambda unit: deepspeed.zero.Init(module=unit, config_dict_or_path=ds_cfg))

    def _mine(self, full: torch.Tensor) -> torch.Tensor:
        """An fp32 copy of `full` (CPU), or under ZeRO-3 of this rank's flat ceil(n / world) partition of it."""
        flat = full.detach().reshape(-1).to(self.ctx.device, torch.float32)
        if self.stage < 3:
            return flat.view(full.shape).clone()
        n = math.ceil(flat.numel() / self.ctx.world_size)
        part = torch.zeros(n, dtype=torch.float32, device=flat.device)
        start = self.ctx.rank * n
        mine = flat[start:start + n]
        part[:mine.numel()] = mine
        return part

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        if self._pairs:
            self.momentum.update(m)

    # -- training step ----------------------------------------------------------------------------
    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        batch = self.inputs(batch)
        return self.ds(*batch) if self._chunks is None else self._chunks.forward(*batch)

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

    @torch.no_grad()
    def call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        training = self.model.training
        self.model.eval()
        self._forget_trace()
        try:
            return self._through.call(method, *self.inputs(inputs))
        finally:
            self.model.train(training)
            self._forget_trace()

    def _forget_trace(self) -> None:
        """ZeRO-3 prefetches asynchronously by the module order it traced in training (as FSDP's explicit
        prefetch, see FSDPEngine.call): a call in another order left the next training step computing another
        loss (measured at world 2: tests/test_knn.py). Around each call every gathered parameter is released
        and the trace invalidated (as DeepSpeed does when hooks change), so a call records rather than
        prefetches, and the next training step records its own trace again."""
        if not self.ds.zero_optimization_partition_weights():
            return
        self.ds.empty_partition_cache()
        coordinator = self._ds_optimizer.parameter_offload.get_param_coordinator()
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()

    # -- state --------------------------------------------------------------------------------------
    def _full_base(self, p: torch.nn.Parameter) -> torch.Tensor:
        """The fp32 master of a trainable parameter (a collective in 16-bit or ZeRO-3)."""
        from deepspeed.utils import safe_get_full_fp32_param

        if self.stage < 3 and self._dtype is None:
            return p.detach()
        if id(p) in self._master_by_id:
            return self._master_by_id[id(p)].detach()
        return safe_get_full_fp32_param(p)

    def _full_frozen(self, name: str, p: torch.nn.Parameter) -> torch.Tensor:
        """A frozen parameter's fp32 value (ZeRO-3: its partitions gathered, a collective)."""
        mine = self._frozen[name]
        if self.stage < 3:
            return mine
        gathered = torch.empty(mine.numel() * self.ctx.world_size, dtype=torch.float32, device=mine.device)
        all_gather_flat(gathered, mine)
        return gathered[:p.ds_numel].view(p.ds_shape)

    def _full_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, whole fp32 tensor) for the model's state dict, one at a time: each may be a collective."""
        params = dict(self.model.named_parameters())
        momentum = dict(zip((f"momentum_encoder.{n}" for n in self._momentum_names), self.momentum.full(),
                            strict=False))  # a generator: each gathered when its name comes
        for name in self.model.state_dict():
            if name not in params:
                yield name, self.model.get_buffer(name).detach()
            elif name in self._frozen:
                yield name, self._full_frozen(name, params[name])
            elif name.startswith("momentum_encoder."):
                twin = "base_encoder." + name.removeprefix("momentum_encoder.")
                yield name, momentum[name] if name in momentum else self._full_frozen(twin, params[twin])
            else:
                yield name, self._full_base(params[name])

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """fp32 masters of the trained parameters, the fp32 momentum encoder, fp32 BN statistics."""
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
        self.ds.save_checkpoint(path, tag=DS_TAG, save_latest=False)
        momentum = [t.detach().to("cpu", copy=True) for t in self.momentum.full()]  # a collective
        if self.ctx.is_main:  # BN statistics too: a universal checkpoint carries trainable parameters only
            buffers = {n: b.detach().cpu().clone() for n, b in self.model.named_buffers()}
            torch.save({"names": self._momentum_names, "tensors": momentum, "buffers": buffers},
                       os.path.join(path, MOMENTUM_FILE))

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
        tag = UNIVERSAL_TAG if universal else DS_TAG
        loaded, _ = self.ds.load_checkpoint(path, tag=tag, load_optimizer_states=True,
                                            load_lr_scheduler_states=False)
        if loaded is None:
            raise ValueError(f"checkpoint {path}: DeepSpeed found no state under {os.path.join(path, tag)}")
        saved = load_checkpoint(os.path.join(path, MOMENTUM_FILE))
        if saved["names"] != self._momentum_names:
            raise ValueError(f"checkpoint {path}/{MOMENTUM_FILE} holds another model's momentum encoder")
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
        self._through = None
        gc.collect()

    # -- the planner's model --------------------------------------------------------------------------
    @classmethod
    def state_bytes(cls, shapes: Shapes, cfg: DeepSpeedConfig, world: int, rank: int, precision: str,
                    optimizer: str) -> dict[str, int]:
        """Per stage: whole (ZeRO-0; in 16 bits beside whole fp32 masters), flat optimizer partitions padded to
        2 x world (ZeRO-1/2, with gradients in ZeRO-2's), or per-parameter ceil(n / world) slices of everything
        (ZeRO-3); the momentum encoder's fp32 copy where the module holds 16 bits."""
        low = precision in ("bf16", "fp16")
        c = 2 if low else 4
        moments, steps = optimizer_state(optimizer)
        n_t, n_f, n_m = numel(shapes.trainable), numel(shapes.frozen), numel(shapes.momentum)
        stage = cfg.zero_stage
        if stage == 0 and not low:
            return {"parameters": 4 * (n_t + n_f), "gradients": 4 * n_t, "momentum": 4 * n_m,
                    "optimizer": 4 * moments * n_t + steps * len(shapes.trainable)}
        if stage == 0:  # 16-bit module, whole fp32 masters (and an fp32 momentum copy) on every rank
            return {"parameters": c * (n_t + n_f), "gradients": c * n_t,
                    "momentum": c * n_m + 4 * numel(shapes.momentum_twins),
                    "optimizer": 4 * n_t + 4 * moments * n_t + steps * len(shapes.trainable)}
        if stage in (1, 2):
            align = 2 * world
            part = math.ceil(n_t / align) * align // world
            fragments = max(0, min(part, numel(shapes.momentum_twins) - rank * part)) if low else 0
            return {"parameters": c * (n_t + n_f), "gradients": c * part, "momentum": c * n_m + 4 * fragments,
                    "optimizer": 4 * part + 4 * moments * part + steps}
        part = z3_part(shapes.trainable, world)
        offload = bool(cfg.deepspeed.get("zero_optimization", {}).get("offload_optimizer"))
        return {"parameters": c * (part + z3_part(shapes.frozen, world)), "gradients": c * part,
                "momentum": c * z3_part(shapes.momentum, world) + (4 * z3_part(shapes.momentum_twins, world)
                                                                      if low else 0),
                "optimizer": 0 if offload else 4 * part + 4 * moments * part + steps}

    @classmethod
    def comm_bytes(cls, shapes: Shapes, cfg: DeepSpeedConfig, world: int, precision: str, chunks: int) -> int:
        """ZeRO-0: an all-reduce of the gradients; ZeRO-1/2: a reduce-scatter of them and an all-gather of the
        updated parameters, and in 16 bits one all-gather of the momentum fragments; ZeRO-3: per chunk, the
        parameters gathered in forward and backward, the momentum encoder's, and the gradients reduce-scattered."""
        low = precision in ("bf16", "fp16")
        p = 2 if low else 4
        n_t, n_m = numel(shapes.trainable) + numel(shapes.frozen), numel(shapes.momentum)
        if cfg.zero_stage == 0:
            return int(2 * ring(world) * numel(shapes.trainable) * p)
        if cfg.zero_stage in (1, 2):
            momentum = ring(world) * numel(shapes.momentum_twins) * 2 if low else 0  # one all-gather, 16-bit
            return int(ring(world) * numel(shapes.trainable) * (p + p) + momentum)
        grads = ring(world) * numel(shapes.trainable) * p
        return int(ring(world) * (chunks * 2 * n_t * p + chunks * n_m * p) + chunks * grads)

    @classmethod
    def buffer_bytes(cls, shapes: Shapes, cfg: DeepSpeedConfig, precision: str, chunk: int) -> int:
        """ZeRO 1-3's reduce bucket."""
        if cfg.zero_stage == 0:
            return 0
        zero = cfg.deepspeed.get("zero_optimization", {})
        return int(zero.get("reduce_bucket_size", 5e8)) * (2 if precision != "fp32" else 4)
