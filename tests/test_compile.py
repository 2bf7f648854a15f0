"""`"compile": true` (per-block torch.compile, CPU inductor) trains as eager does: the same losses and weights
for a tiny ViT under DDP and FSDP (with activation checkpointing) at world 2, in real gloo processes.

-m slow: inductor compiles C++ kernels for each block graph (about a minute per process here)."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, build_engine, engine_config, rel_err, spawn
from torch.distributed.tensor import DTensor

from moco_scale import build_moco
from moco_scale.dist import DistContext
from moco_scale.engines import load_engine_config

pytestmark = pytest.mark.slow
B, STEPS = 8, 3
CASES = {"ddp": {}, "fsdp": {"activation_checkpointing": 1}}  # compile after checkpointing, before sharding


def full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def train(ctx: DistContext, config: str, compiled: bool) -> dict:
    torch.manual_seed(0)
    cfg = load_engine_config(engine_config(config), B, ctx.world_size).with_precision("fp32")
    cfg = cfg.replace(**CASES[config], compile=compiled)
    engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
    g = torch.Generator().manual_seed(ctx.rank)
    losses, grads = [], {}
    for step in range(STEPS):
        x1, x2 = torch.randn(B // 2, 3, 32, 32, generator=g), torch.randn(B // 2, 3, 32, 32, generator=g)
        if step == 0:  # train_step's order, opened up to read the first gradients
            engine.update_momentum(0.99)
            loss = engine.forward(x1, x2)
            engine.backward(loss)
            grads = {n: full(p.grad).clone() for n, p in engine.model.named_parameters() if p.grad is not None}
            engine.step(1e-3)
        else:
            loss = engine.train_step((x1, x2), 1e-3 * (step + 1), 0.99)
        losses.append(loss.item())
    compiled_blocks = sum(getattr(m, "_compiled_call_impl", None) is not None for m in engine.model.modules())
    state = engine.full_state_dict()  # weights after AdamW are not compared: it turns rounding noise in gradients
    # that are zero in theory (key biases, biases before a BN) into lr-sized steps
    engine.close()
    return {"losses": losses, "grads": grads, "keys": list(state), "compiled_blocks": compiled_blocks}


def record(ctx: DistContext, out: str) -> None:
    from torch._dynamo.utils import counters

    rec = {}
    for config in CASES:
        rec[config] = {compiled: train(ctx, config, compiled) for compiled in (False, True)}
    rec["graphs"] = counters["stats"]["unique_graphs"]
    torch.save(rec, f"{out}/rank{ctx.rank}.pt")


@pytest.fixture(scope="module")
def seen(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("compile")
    spawn(record, 2, str(out))
    return [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_blocks_were_compiled(seen):
    depth = TINY_VIT["depth"]
    for rec in seen:
        for config in CASES:
            assert rec[config][False]["compiled_blocks"] == 0
            assert rec[config][True]["compiled_blocks"] == 2 * depth  # both encoders
        assert rec["graphs"] >= 2  # the base encoder's training block and the momentum encoder's no-grad one


@pytest.mark.parametrize("config", CASES)
def test_compiled_blocks_train_as_eager(seen, config):
    for rec in seen:
        eager, compiled = rec[config][False], rec[config][True]
        assert compiled["losses"] == pytest.approx(eager["losses"], rel=1e-5, abs=1e-5)
        assert compiled["keys"] == eager["keys"]  # names as eager: checkpoints are interchangeable
        assert compiled["grads"].keys() == eager["grads"].keys() and len(eager["grads"]) > 20
        worst = max(rel_err(compiled["grads"][k], g, atol=1e-7) for k, g in eager["grads"].items())
        assert worst < 1e-5
