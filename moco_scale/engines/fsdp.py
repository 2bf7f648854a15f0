"""PyTorch FSDP2 (fully_shard): parameters, gradients and optimizer state sharded over ranks.

The plan, as torchtitan's `parallelize`: one FSDP unit per backbone block, one per head, the
rest in the root. Base and momentum encoders get the same plan, so each parameter of one has
the same dim-0 shard as its twin in the other: the momentum update is a `lerp_` of local
shards, fp32 (FSDP keeps sharded parameters in fp32 and casts only the gathered copies), with
no communication, as in DINOv2's teacher. The model is sharded on the meta device and its local
shards filled afterwards (engines/prepare.py): no rank holds the whole model.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from moco_scale.dist import DistContext
from moco_scale.engines.base import DTYPES, SCALER, resolve_precision
from moco_scale.engines.config import EngineConfig, FSDPConfig
from moco_scale.engines.memory import Shapes, fsdp_shard, numel, optimizer_state, ring
from moco_scale.engines.prepare import materialize_shards, prepare, take_state
from moco_scale.engines.torch_engine import TorchEngine
from moco_scale.models.chunking import PHASES, PhasedChunks
from moco_scale.models.init import InitialState
from moco_scale.models.parts import Part, TrainModule
from moco_scale.optim import OptimizerSpec, local_shard


class FSDPEngine(TorchEngine):
    """FSDP2 full shard (`reshard_after_forward: true`) or gradient/optimizer sharding only (false)."""

    name = "fsdp"

    def __init__(self, model: TrainModule, optimizer: OptimizerSpec, config: FSDPConfig, ctx: DistContext,
                 initial: InitialState | None = None) -> None:
        self.ctx, self.model, self.module = ctx, model, model
        self.precision = resolve_precision(config.precision, ctx.device)
        self._reshard_after_forward = config.reshard_after_forward  # the chunked step changes and restores it
        state = take_state(model, initial)
        parts = model.parts()
        prepare(model, config, phased_chunks=True, shard=lambda: self._shard(model, parts, config))
        materialize_shards(model, state, ctx.device)
        #: units the engine reshards itself, after forward and after backward (see _keep_gathered)
        self._reshard_after_forward_units: list[torch.nn.Module] = []
        self._reshard_after_backward_units: list[torch.nn.Module] = []
        #: unit -> the unit its forward prefetches (the training order); empty with chunking
        self._forward_prefetch: dict[torch.nn.Module, torch.nn.Module] = {}
        if not config.backbone_chunk:  # a chunked step runs in phases, and keeps its blocks gathered across them
            self._forward_prefetch = self._prefetch(model, parts)
        if self._reshard_after_forward:
            self._reshard_after_forward_units, self._reshard_after_backward_units = self._keep_gathered(
                parts, last_block=not config.backbone_chunk)
        self._pairs = [(m, b) for _, m, b in model.momentum_pairs()]
        # the root's hooks (gather, reshard) run around each phase, as around forward; evaluations call the
        # phases' base_features / momentum_features too (the kNN curve)
        for method in PHASES:
            if hasattr(model, method):
                register_fsdp_forward_method(model, method)
        self._chunks = PhasedChunks(model, config.backbone_chunk) if config.backbone_chunk else None
        # the units a chunked pass runs once per chunk: the training part's blocks and the root (patch embedding,
        # tokens, final norm); the heads and the predictor run once per step
        self._base_units = [model, *(b for p in parts if p.trains for b in p.blocks)]
        self._momentum_units = [b for p in parts if not p.trains for b in p.blocks]
        self.optimizer = optimizer.build(model)
        if self.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(**SCALER)

    def _shard(self, model: TrainModule, parts: list[Part], config: FSDPConfig) -> None:
        """One unit per block and per head of every part (twins get the same plan), then the root."""
        mesh = init_device_mesh(self.ctx.device.type, (self.ctx.world_size,))
        policy = MixedPrecisionPolicy()
        if self.precision != "fp32":
            policy = MixedPrecisionPolicy(param_dtype=DTYPES[self.precision],
                                          reduce_dtype=DTYPES[config.reduce_dtype])
        shard = dict(mesh=mesh, mp_policy=policy, reshard_after_forward=self._reshard_after_forward)
        for part in parts:
            for unit in (*part.blocks, *part.heads):
                fully_shard(unit, **shard)
        fully_shard(model, **shard)

    @staticmethod
    def _prefetch(model: TrainModule, parts: list[Part]) -> dict[torch.nn.Module, torch.nn.Module]:
        """Explicit prefetch, as torchtitan and DINOv3: each block's forward issues the next unit's all-gather
        (a momentum encoder's no-grad forward too), each training block's backward the previous block's. A ViT
        runs in one order, blocks -> heads (projector, predictor) -> momentum blocks -> momentum head; a ResNet
        runs each view through its blocks, so there only block to block."""
        for part in (p for p in parts if p.trains):  # a momentum encoder has no backward
            for block, previous in zip(part.blocks[1:], part.blocks, strict=False):
                block.set_modules_to_backward_prefetch([previous])
        order: list[torch.nn.Module] = []
        forward: dict[torch.nn.Module, torch.nn.Module] = {}
        for part in parts:
            order += [*part.blocks, *part.heads]
            if not model.batch_views:
                forward.update(zip(part.blocks, part.blocks[1:], strict=False))
        if model.batch_views:
            forward.update(zip(order, order[1:], strict=False))
        for unit, nxt in forward.items():
            unit.set_modules_to_forward_prefetch([nxt])
        return forward

    @staticmethod
    def _keep_gathered(parts: list[Part], last_block: bool) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """Units not resharded where resharding would only cost another gather (as torchtitan keeps its last
        block): a training part's last block runs again in backward soon after its forward (FSDP2 reshards it
        after its backward); heads run once per view, twice in forward and twice in backward, so they stay
        gathered through both (the engine reshards a training part's heads after backward, a momentum head,
        which has no backward, after forward). Measured on the tiny ViT at world 2: 19 -> 11 all-gathers per
        step. The chunked step keeps its blocks gathered itself (`last_block` False). Returns (units to
        reshard after forward, after backward)."""
        after_forward, after_backward = [], []
        for part in parts:
            last = part.blocks[-1:] if last_block and part.trains else []
            for unit in (*last, *part.heads):
                unit.set_reshard_after_forward(False, recurse=False)
            if part.trains:
                for unit in part.heads:
                    unit.set_reshard_after_backward(False, recurse=False)
                after_backward += part.heads
            else:
                after_forward += part.heads
        return after_forward, after_backward

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        # frozen base parameters (fixed position embedding, stop-grad conv1) never change, nor do their twins
        if self._pairs:
            momentum, base = [local_shard(p) for p, _ in self._pairs], [local_shard(p) for _, p in self._pairs]
            torch._foreach_lerp_(momentum, base, 1.0 - m)

    def forward(self, *batch: torch.Tensor) -> torch.Tensor:
        batch = self.inputs(batch)
        loss = self.model(*batch) if self._chunks is None else self._chunked_forward(*batch)
        for unit in self._reshard_after_forward_units:
            unit.reshard()
        return loss

    def _chunked_forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # gathered once per pass, not once per chunk: blocks stay unsharded between chunks (the base encoder's
        # until its last chunk's backward, the momentum encoder's until its features are done)
        for unit in (*self._base_units, *self._momentum_units):
            unit.set_reshard_after_forward(False, recurse=False)
        self._accumulate(True)
        loss = self._chunks.forward(x1, x2)
        for unit in self._momentum_units:
            unit.reshard()
            unit.set_reshard_after_forward(self._reshard_after_forward, recurse=False)
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        scaled = loss if self.scaler is None else self.scaler.scale(loss)
        if self._chunks is None:
            scaled.backward()
        else:
            # the heads' gradients are reduced in the first backward; the backbone's are summed unsharded over
            # the chunks and reduce-scattered once, in the last chunk's backward, which also reshards the blocks
            self._chunks.backward(scaled, torch.Tensor.backward, lambda i, n: self._accumulate(i < n - 1))
            for unit in self._base_units:
                unit.set_reshard_after_forward(self._reshard_after_forward, recurse=False)
        for unit in self._reshard_after_backward_units:
            unit.reshard()

    def _accumulate(self, on: bool) -> None:
        """Keep the backbone's gradients unreduced and its parameters gathered across backward passes (on)."""
        for unit in self._base_units:
            unit.set_requires_gradient_sync(not on, recurse=False)
            unit.set_reshard_after_backward(not on, recurse=False)

    @torch.no_grad()
    def call(self, method: str, *inputs: torch.Tensor) -> torch.Tensor:
        """Without the training order's forward prefetch: a call ends elsewhere (a backbone's features), and the
        unit its last block would prefetch (a momentum head) kept an all-gather from before the next momentum
        update, which the next training forward then used (its loss changed: tests/test_knn.py)."""
        for unit in self._forward_prefetch:
            unit.set_modules_to_forward_prefetch([])
        try:
            out = super().call(method, *inputs)
        finally:
            for unit, nxt in self._forward_prefetch.items():
                unit.set_modules_to_forward_prefetch([nxt])
        for unit in self._reshard_after_forward_units + self._reshard_after_backward_units:
            unit.reshard()  # kept gathered for a training step's backward, which an evaluation does not run
        return out

    # -- the planner's model --------------------------------------------------------------------------
    @classmethod
    def state_bytes(cls, shapes: Shapes, cfg: EngineConfig, world: int, rank: int, precision: str,
                    optimizer: str) -> dict[str, int]:
        """FSDP2's dim-0 row shards; parameters stay fp32 (only the gathered copies are cast)."""
        moments, steps = optimizer_state(optimizer)
        local = lambda shapes_: sum(fsdp_shard(s, world, rank) for s in shapes_)  # noqa: E731
        t = local(shapes.trainable)
        return {"parameters": 4 * (t + local(shapes.frozen)), "gradients": 4 * t,
                "momentum": 4 * local(shapes.momentum), "optimizer": 4 * moments * t + steps * len(shapes.trainable)}

    @classmethod
    def comm_bytes(cls, shapes: Shapes, cfg: FSDPConfig, world: int, precision: str, chunks: int) -> int:
        """All-gathers of the parameters (the base twice with full shard, unless chunked), the momentum encoder's,
        and one reduce-scatter of the gradients."""
        p = 2 if precision in ("bf16", "fp16") else 4
        reduce = 4 if cfg.reduce_dtype == "fp32" else 2
        n_t, n_m = numel(shapes.trainable) + numel(shapes.frozen), numel(shapes.momentum)
        base_gathers = 1 if chunks > 1 or not cfg.reshard_after_forward else 2
        return int(ring(world) * (base_gathers * n_t * p + n_m * p + numel(shapes.trainable) * reduce))

    @classmethod
    def buffer_bytes(cls, shapes: Shapes, cfg: EngineConfig, precision: str, chunk: int) -> int:
        """While chunking, the backbone stays gathered (compute dtype) with fp32 gradient sums."""
        return numel(shapes.trainable) * ((2 if precision != "fp32" else 4) + 4) if chunk else 0
