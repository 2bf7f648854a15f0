"""--backbone-chunk: one step with the ViT backbone run in chunks of K crops equals the unchunked step
(loss, and every gradient up to reassociation), under DDP, FSDP and DeepSpeed ZeRO-0/2/3, world 2."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_RESNET, TINY_VIT, build_engine, engine_config, rel_err, spawn

from moco_scale import build_moco
from moco_scale.dist import DistContext, mean_across_ranks
from moco_scale.engines import load_engine_config

B = 16  # per rank: 8 images, 16 crops through the backbone


def full_grads(engine) -> dict[str, torch.Tensor]:
    """The whole averaged gradient of every trainable parameter, whatever the engine's layout."""
    out = {}
    for name, p in engine.model.named_parameters():
        if not p.requires_grad:
            continue
        if getattr(engine, "_ds_optimizer", None) is not None and engine.stage > 0:
            from deepspeed.utils import safe_get_full_grad

            g = safe_get_full_grad(p)
        else:
            g = p.grad
            g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name] = g.detach().float().clone()
    return out


SETTINGS = ((0, 0), (1, 0), (3, 0), (16, 0), (3, 1))  # (chunk K, activation checkpointing every); 16 = all crops


def one_step(ctx: DistContext, config: str, settings, out_path) -> None:
    """One momentum update, forward and backward per (chunk, activation checkpointing[, precision]) setting."""
    runs = {}
    for chunk, ac, *precision in settings:
        precision = precision[0] if precision else "fp32"
        cfg = load_engine_config(engine_config(config), B, ctx.world_size)
        cfg = cfg.replace(backbone_chunk=chunk, activation_checkpointing=ac)
        if cfg.engine == "deepspeed":
            cfg.deepspeed["bf16"] = {"enabled": precision == "bf16"}
        else:
            cfg = cfg.replace(precision=precision)
        torch.manual_seed(0)
        engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
        g = torch.Generator().manual_seed(1)
        x1, x2 = torch.randn(B, 3, 32, 32, generator=g), torch.randn(B, 3, 32, 32, generator=g)
        b = B // ctx.world_size
        engine.update_momentum(0.99)
        loss = engine.forward(x1[ctx.rank * b:(ctx.rank + 1) * b], x2[ctx.rank * b:(ctx.rank + 1) * b])
        engine.backward(loss)
        loss = mean_across_ranks(loss.detach().float()).item()
        runs[chunk, ac, precision] = {"loss": loss, "grads": full_grads(engine)}
        engine.close()
    if ctx.is_main:
        torch.save(runs, out_path)


def check_equal(runs: dict, rtol: float, atol: float) -> None:
    want = runs[0, 0, "fp32"]
    assert len(want["grads"]) > 10 and all(g.abs().sum() > 0 for k, g in want["grads"].items() if "blocks.0" in k)
    for key, got in runs.items():
        assert abs(got["loss"] - want["loss"]) <= rtol * abs(want["loss"]), key
        for name, g in want["grads"].items():
            assert rel_err(got["grads"][name], g, atol=atol) <= rtol, (key, name, rel_err(got["grads"][name], g))


# ZeRO-0 and ZeRO-2 take the same autograd-function form as DDP (the module holds its parameters): -m slow
@pytest.mark.parametrize("config", ["ddp", *(pytest.param(c, marks=pytest.mark.slow) for c in ("zero0", "zero2")),
                                    "fsdp", "zero3"])
def test_chunked_step_equals_the_unchunked_one(config, tmp_path):
    """fp32, world 2: loss to 1e-6, every gradient to 1e-5 relative (1e-7 per element absorbs gradients that are
    pure rounding noise, ~1e-8, exactly zero in exact arithmetic: the final LayerNorm bias feeds Linear -> BN)."""
    spawn(one_step, 2, config, SETTINGS, tmp_path / "runs.pt")
    check_equal(torch.load(tmp_path / "runs.pt"), rtol=1e-5, atol=1e-7)


def flat_error(got: dict, want: dict) -> float:
    names = sorted(want)
    return rel_err(torch.cat([got[k].flatten() for k in names]), torch.cat([want[k].flatten() for k in names]))


@pytest.mark.parametrize("config", ["fsdp", "zero3"])
def test_chunked_step_in_bf16(config, tmp_path):
    """bf16 rounds differently per chunk, so chunked and unchunked bf16 differ by bf16 noise: both are held to
    the fp32 gradient, chunking adding no more than half again the unchunked step's own bf16 error."""
    spawn(one_step, 2, config, ((0, 0, "fp32"), (0, 0, "bf16"), (3, 0, "bf16")), tmp_path / "runs.pt")
    runs = torch.load(tmp_path / "runs.pt")
    want = runs[0, 0, "fp32"]["grads"]
    plain, chunked = (flat_error(runs[k, 0, "bf16"]["grads"], want) for k in (0, 3))
    print(f"bf16 gradient error against fp32: unchunked {plain:.2e}, chunked {chunked:.2e}")
    assert 0 < plain < 0.5 and chunked <= 1.5 * plain
    assert abs(runs[3, 0, "bf16"]["loss"] - want_loss(runs)) <= 2e-2 * want_loss(runs)


def want_loss(runs: dict) -> float:
    return runs[0, 0, "fp32"]["loss"]


def count_collectives(ctx: DistContext, out_path) -> None:
    """Calls of FSDP2's all-gather and reduce-scatter in the second step (the first builds optimizer state)."""
    import collections

    import torch.distributed as dist

    counts: collections.Counter = collections.Counter()
    def counting(name: str):
        real = getattr(dist, name)

        def counted(*args, **kwargs):
            counts[name] += 1
            return real(*args, **kwargs)
        return counted

    # FSDP2 calls the newer names where torch has them (2.14), all_gather_into_tensor/reduce_scatter_tensor on 2.11
    names = [new if hasattr(dist, new) else old for new, old in (("all_gather_single", "all_gather_into_tensor"),
                                                                   ("reduce_scatter_single", "reduce_scatter_tensor"))]
    for name in names:
        setattr(dist, name, counting(name))
    out = {}
    for chunk in (0, 1, 4, 16):
        cfg = load_engine_config(engine_config("fsdp"), B, ctx.world_size)
        cfg = cfg.replace(backbone_chunk=chunk)
        engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
        x = torch.randn(B // ctx.world_size, 3, 32, 32)
        engine.train_step((x, x), 1e-3, 0.99)
        counts.clear()
        engine.train_step((x, x), 1e-3, 0.99)
        out[chunk] = dict(counts)
        engine.close()
    if ctx.is_main:
        torch.save(out, out_path)


def test_fsdp_gathers_and_reduces_once_per_step_whatever_the_chunk_count(tmp_path):
    """16 crops per rank in 16, 4 or 1 chunks: the same number of all-gathers and reduce-scatters (the blocks stay
    gathered across the chunks of a pass and their gradients are reduced once), no more than without chunking."""
    spawn(count_collectives, 2, tmp_path / "counts.pt")
    counts = torch.load(tmp_path / "counts.pt")
    assert counts[1] == counts[4] == counts[16], counts
    for name, n in counts[16].items():
        assert 0 < n <= counts[0][name], (name, counts)


def test_chunking_refuses_a_backbone_with_batchnorm():
    with pytest.raises(ValueError, match="needs a backbone without BatchNorm"):
        build_moco(**TINY_RESNET).set_backbone_chunk(4)
