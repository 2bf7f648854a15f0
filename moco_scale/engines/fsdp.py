"""PyTorch FSDP2 (fully_shard): parameters, gradients and optimizer state sharded over ranks.

The plan, as torchtitan's `parallelize`: one FSDP unit per backbone block, one per head, the
rest in the root. Base and momentum encoders get the same plan, so each parameter of one has
the same dim-0 shard as its twin in the other: the momentum update is a `lerp_` of local
shards, fp32 (FSDP keeps sharded parameters in fp32 and casts only the gathered copies), with
no communication, as in DINOv2's teacher.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from moco_scale.dist import DistContext
from moco_scale.engines import dcp
from moco_scale.engines.activation_checkpointing import apply_activation_checkpointing
from moco_scale.engines.base import PRECISIONS, Engine, resolve_precision
from moco_scale.engines.compile import compile_blocks
from moco_scale.models import MoCo, backbone_blocks, projector
from moco_scale.models.chunking import PhasedChunks
from moco_scale.models.moco import PHASES
from moco_scale.optim import build_optimizer, local_shard

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


class FSDPEngine(dcp.DCPCheckpoints, Engine):
    """FSDP2 full shard (`reshard_after_forward: true`) or gradient/optimizer sharding only (false)."""

    name = "fsdp"
    DEFAULTS = {"engine": "fsdp", "precision": "auto", "reshard_after_forward": True, "reduce_dtype": "fp32",
                "activation_checkpointing": 0, "backbone_chunk": 0, "compile": False}
    CHOICES = {"engine": ("fsdp",), "precision": PRECISIONS, "reduce_dtype": ("fp32", "bf16", "fp16")}
    needs_process_group = True

    def __init__(self, model: MoCo, optimizer: str, weight_decay: float, config: dict[str, Any],
                 ctx: DistContext) -> None:
        self.ctx = ctx
        self.precision = resolve_precision(config["precision"], ctx.device)
        apply_activation_checkpointing(model, config["activation_checkpointing"])
        compile_blocks(model, config["compile"])  # after checkpointing, before sharding, as torchtitan
        model.check_backbone_chunk(config["backbone_chunk"])
        self.model = model.to(ctx.device)
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
        policy = MixedPrecisionPolicy()
        if self.precision != "fp32":
            policy = MixedPrecisionPolicy(param_dtype=_DTYPES[self.precision],
                                          reduce_dtype=_DTYPES[config["reduce_dtype"]])
        shard = dict(mesh=mesh, mp_policy=policy)
        self._reshard_after_forward = config["reshard_after_forward"]  # the chunked step changes and restores it
        for encoder in (model.base_encoder, model.momentum_encoder):  # the same plan for both
            for unit in (*backbone_blocks(encoder), projector(encoder)):
                fully_shard(unit, **shard, reshard_after_forward=self._reshard_after_forward)
        fully_shard(model.predictor, **shard, reshard_after_forward=self._reshard_after_forward)
        fully_shard(model, **shard, reshard_after_forward=self._reshard_after_forward)
        #: units the engine reshards itself, after forward and after backward (see _keep_gathered)
        self._reshard_after_forward_units: list[torch.nn.Module] = []
        self._reshard_after_backward_units: list[torch.nn.Module] = []
        if not config["backbone_chunk"]:  # a chunked step runs in phases, and keeps its blocks gathered across them
            self._prefetch(model)
        if self._reshard_after_forward:
            self._reshard_after_forward_units, self._reshard_after_backward_units = self._keep_gathered(
                model, last_block=not config["backbone_chunk"])
        self._pairs = [(m, b) for _, m, b in model.momentum_pairs()]
        self._chunks = None
        if config["backbone_chunk"]:
            for method in PHASES:  # the root's hooks (gather, reshard) run around each phase, as around forward
                register_fsdp_forward_method(model, method)
            self._chunks = PhasedChunks(self.model, config["backbone_chunk"])
        # the units a chunked pass runs once per chunk: the backbone blocks and the root (patch embedding, tokens,
        # final norm); the heads and the predictor run once per step
        self._base_units = [model, *backbone_blocks(model.base_encoder)]
        self._momentum_units = backbone_blocks(model.momentum_encoder)
        self.optimizer = build_optimizer(optimizer, model.trainable_parameters(), weight_decay)
        self.scaler = None
        if self.precision == "fp16":
            from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

            self.scaler = ShardedGradScaler(init_scale=2.0**16, growth_interval=2000)

    @staticmethod
    def _prefetch(model: MoCo) -> None:
        """Explicit prefetch, as torchtitan and DINOv3: each block's forward issues the next unit's all-gather
        (the momentum encoder's no-grad forward too), each base block's backward the previous block's. A ViT
        runs in one order, blocks -> head -> predictor -> momentum blocks -> momentum head; a ResNet runs each
        view through its blocks, so there only block to block."""
        base = backbone_blocks(model.base_encoder)
        for block, previous in zip(base[1:], base, strict=False):  # the momentum encoder has no backward
            block.set_modules_to_backward_prefetch([previous])
        order: list[torch.nn.Module] = []
        for encoder in (model.base_encoder, model.momentum_encoder):
            blocks = backbone_blocks(encoder)
            order += [*blocks, projector(encoder), *([model.predictor] if encoder is model.base_encoder else [])]
            if not model.batch_views:
                for block, nxt in zip(blocks, blocks[1:], strict=False):
                    block.set_modules_to_forward_prefetch([nxt])
        if model.batch_views:
            for unit, nxt in zip(order, order[1:], strict=False):
                unit.set_modules_to_forward_prefetch([nxt])

    @staticmethod
    def _keep_gathered(model: MoCo, last_block: bool) -> tuple[list[torch.nn.Module], list[torch.nn.Module]]:
        """Units not resharded where resharding would only cost another gather (as torchtitan keeps its last
        block): the base encoder's last block runs again in backward soon after its forward (FSDP2 reshards it
        after its backward); the heads and the predictor run once per view, twice in forward and twice in
        backward, so they stay gathered through both (the engine reshards the base head and the predictor
        after backward, the momentum head, which has no backward, after forward). Measured on the tiny ViT
        at world 2: 19 -> 11 all-gathers per step. The chunked step keeps its blocks gathered itself
        (`last_block` False). Returns (units to reshard after forward, after backward)."""
        base_heads = [projector(model.base_encoder), model.predictor]
        last = backbone_blocks(model.base_encoder)[-1:] if last_block else []
        for unit in (*last, *base_heads, projector(model.momentum_encoder)):
            unit.set_reshard_after_forward(False, recurse=False)
        for unit in base_heads:
            unit.set_reshard_after_backward(False, recurse=False)
        return [projector(model.momentum_encoder)], base_heads

    @torch.no_grad()
    def update_momentum(self, m: float) -> None:
        # frozen base parameters (fixed position embedding, stop-grad conv1) never change, nor do their twins
        momentum, base = [local_shard(p) for p, _ in self._pairs], [local_shard(p) for _, p in self._pairs]
        torch._foreach_lerp_(momentum, base, 1.0 - m)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1, x2 = x1.to(self.ctx.device, non_blocking=True), x2.to(self.ctx.device, non_blocking=True)
        loss = self.model(x1, x2) if self._chunks is None else self._chunked_forward(x1, x2)
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

    def step(self, lr: float) -> None:
        self.set_lr(lr)
        if self.scaler is None:
            self.optimizer.step()
        else:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)

    def grad_norm(self, name: str) -> float:
        grad = self.model.get_parameter(name).grad
        if grad is None:
            return 0.0
        norm = _full(grad.float().norm()).item()  # a DTensor's norm is reduced over the shards
        return norm / self.scaler.get_scale() if self.scaler is not None else norm

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every rank gathers every tensor (a collective in the same order everywhere)."""
        return {k: _full(v) for k, v in self.model.state_dict().items()}

    @classmethod
    def label(cls, cfg: dict[str, Any]) -> str:
        return "fsdp full shard" if cfg["reshard_after_forward"] else "fsdp grad/optimizer shard"

