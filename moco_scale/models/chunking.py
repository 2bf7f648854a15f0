"""A backbone run in chunks of K images, exactly: the memory of a step follows K, not the batch.

Forward: every chunk without autograd, features concatenated; the heads, the keys and the
InfoNCE then see the whole per-rank batch (BN statistics as without chunking). Backward: each
chunk's forward is recomputed with autograd and back-propagated with its slice of the features'
gradient. The gradients equal the unchunked step's up to floating-point reassociation (the sum
over images is split in K-sized parts), because a BN-free backbone treats every image on its own.

Two forms, one per kind of engine:

- `chunked` (DDP, ZeRO 0-2: the module holds its parameters): an autograd function whose
  backward sums the chunk gradients with `torch.autograd.grad` and hands them back once per
  parameter, so gradient hooks (DDP's all-reduce, ZeRO's reduce-scatter) fire once per step.
- `PhasedChunks` (FSDP, ZeRO-3: parameters gathered per block by hooks, which break when a
  backward runs inside another backward): the step is split into separate engine forward and
  backward calls through the wrapped module (the phase methods of `ChunkPhases`, which MoCo inherits),
  as gradient accumulation does, with the engine deciding per chunk whether to reduce and reshard.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import torch

from moco_scale.loss import symmetric_loss
from moco_scale.models.parts import backbone_features, projector


class Phases(Protocol):
    """The MoCo methods a phased step calls (an engine hands the model, or an adapter through its wrapper)."""

    def base_features(self, crops: torch.Tensor) -> torch.Tensor: ...
    def momentum_features(self, crops: torch.Tensor) -> torch.Tensor: ...
    def loss_from_features(self, features: torch.Tensor, momentum_features: torch.Tensor) -> torch.Tensor: ...


class ChunkPhases:
    """The phase methods of MoCo a phased chunked step calls one at a time, through the engine's wrapped module
    (MoCo inherits them; `PHASES` names them for the engines that route them). An evaluation between steps
    calls base_features / momentum_features the same way (Engine.call: the kNN curve)."""

    base_encoder: torch.nn.Module
    momentum_encoder: torch.nn.Module
    predictor: torch.nn.Module
    temperature: float

    def base_features(self, crops: torch.Tensor) -> torch.Tensor:
        """Backbone features of the base encoder (a copy: a view would carry FSDP2's hooks poorly)."""
        return backbone_features(self.base_encoder, crops).clone()

    def momentum_features(self, crops: torch.Tensor) -> torch.Tensor:
        return backbone_features(self.momentum_encoder, crops).clone()

    def loss_from_features(self, features: torch.Tensor, momentum_features: torch.Tensor) -> torch.Tensor:
        """The loss from backbone features of both views stacked (view 1 first): heads per view, as `forward`."""
        head = projector(self.base_encoder)
        z1, z2 = (head(f) for f in features.chunk(2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():
            head_m = projector(self.momentum_encoder)
            k1, k2 = (head_m(f) for f in momentum_features.chunk(2))
        return symmetric_loss(q1, q2, k1, k2, self.temperature)


#: the phase methods an engine routes through its wrapped module
PHASES = ("base_features", "momentum_features", "loss_from_features")


class _ChunkedParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Callable, chunk: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.chunk, ctx.params = run, chunk, params
        # backward runs outside the step's autocast region: its recomputation re-enters the forward's state,
        # as torch.utils.checkpoint does, or a bf16 step would recompute (and back-propagate) in fp32
        device = x.device.type
        ctx.autocast = dict(device_type=device, dtype=torch.get_autocast_dtype(device),
                            enabled=torch.is_autocast_enabled(device))
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([run(c) for c in x.split(chunk)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        inputs = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if need]
        total: list[torch.Tensor | None] = [None] * len(inputs)
        for c, g in zip(x.split(ctx.chunk), grad.split(ctx.chunk), strict=True):
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.run(c.detach())
            for i, gr in enumerate(torch.autograd.grad(out, inputs, g, allow_unused=True)):
                if gr is not None:  # summed in fp32 at least: 16-bit weights must not lose small chunk sums
                    gr = gr.to(torch.promote_types(gr.dtype, torch.float32))
                    total[i] = gr if total[i] is None else total[i].add_(gr)
        it = iter(total)
        grads = [None if not need else next(it) for need in ctx.needs_input_grad[3:]]
        return (None, None, None, *(None if g is None else g.to(p.dtype) for g, p in zip(grads, ctx.params,
                                                                                            strict=True)))


def chunked(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int,
            params: Sequence[torch.Tensor]) -> torch.Tensor:
    """run(x) computed in chunks of `chunk` images with recomputation in backward (see the module doc)."""
    if not torch.is_grad_enabled():
        return torch.cat([run(c) for c in x.split(chunk)])
    return _ChunkedParams.apply(x, run, chunk, *params)


class PhasedChunks:
    """The chunked step as separate passes of the phase methods of `phases` (see `Phases`).

    `forward` runs every chunk of both encoders without autograd and returns the loss computed from
    the features, which are an autograd leaf; `backward` back-propagates that loss (gradients of the
    heads and predictor, and of the features), then recomputes each chunk with autograd and
    back-propagates the surrogate (out * g).sum(), whose gradient at `out` is exactly g. The engine's
    `before_chunk` runs before each chunk's recomputation (FSDP: reduce in the last chunk's backward only).
    A loss scale (fp16) is applied once: the features' gradient carries it into the chunks' backward
    (FSDP), or `grad_scale` divides it out where the engine scales every backward (DeepSpeed).
    """

    def __init__(self, phases: Phases, chunk: int) -> None:
        self.phases, self.chunk = phases, chunk
        self._crops: tuple[torch.Tensor, ...] = ()
        self._features: torch.Tensor | None = None

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        self._crops = torch.cat([x1, x2]).split(self.chunk)
        with torch.no_grad():
            features = torch.cat([self.phases.base_features(c) for c in self._crops])
            momentum = torch.cat([self.phases.momentum_features(c) for c in self._crops])
        self._features = features.requires_grad_()
        return self.phases.loss_from_features(self._features, momentum)

    def backward(self, loss: torch.Tensor, backward: Callable[[torch.Tensor], None],
                 before_chunk: Callable[[int, int], None], grad_scale: float = 1.0) -> None:
        """`backward(t)` is the engine's backward of a scalar; `before_chunk(i, n)` runs before the
        recomputation of chunk i of n; `grad_scale` is a loss scale that `backward` applies to every scalar
        (DeepSpeed fp16), divided out of the features' gradient (a power of two: exact)."""
        if self._features is None:
            raise RuntimeError("PhasedChunks.backward without a forward")
        features, crops, self._crops, self._features = self._features, self._crops, (), None
        backward(loss)
        grad = features.grad if grad_scale == 1.0 else features.grad / grad_scale
        for i, (c, g) in enumerate(zip(crops, grad.split(self.chunk), strict=True)):
            before_chunk(i, len(crops))
            out = self.phases.base_features(c)
            backward((out * g.to(out.dtype)).sum())
