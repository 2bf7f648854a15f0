"""A backbone run in chunks of K images, exactly: the memory of a step follows K, not the batch.

Forward: every chunk without autograd, features concatenated; the heads, the keys and the
InfoNCE then see the whole per-rank batch. Backward: each chunk's forward is recomputed with
autograd and back-propagated with its slice of the features' gradient. The gradients equal
the unchunked step's up to floating-point reassociation (the sum over images is split in K-sized
parts), because a BN-free backbone treats every image independently.

The chunk gradients are summed with `torch.autograd.grad` and handed back once per parameter
(the parameters are inputs of the autograd function), so gradient hooks (DDP's all-reduce, ZeRO's
reduce-scatter) fire once per step, as without chunking. That needs the module to hold its
parameters: DDP and ZeRO 0-2. Engines that gather parameters per block by hooks (FSDP, ZeRO-3)
refuse chunking for now: back-propagating each chunk on its own inside the outer backward (as
reentrant checkpointing does) was measured to break both (FSDP2's gradients come out wrong;
ZeRO-3 asserts that a parameter entered its reduce bucket twice).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch


class _ChunkedParams(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, run: Callable, chunk: int, *params: torch.Tensor) -> torch.Tensor:
        ctx.run, ctx.chunk, ctx.params = run, chunk, params
        ctx.save_for_backward(x)
        with torch.no_grad():
            return torch.cat([run(c) for c in x.split(chunk)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        inputs = [p for p, need in zip(ctx.params, ctx.needs_input_grad[3:], strict=True) if need]
        total: list[torch.Tensor | None] = [None] * len(inputs)
        for c, g in zip(x.split(ctx.chunk), grad.split(ctx.chunk), strict=True):
            with torch.enable_grad():
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
