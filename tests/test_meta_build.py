"""No rank builds the whole model before sharding (issue 29): a model built on the meta device is placed by the
engine shard by shard, FSDP filling its local shards module by module, ZeRO-3 one unit at a time partitioned
before the next. Counted with real gloo processes at world 2: the CPU bytes held at the peak of the build stay
below the unsharded model plus one block, and the built engine holds exactly the values a whole build on the
CPU gives (the same seed)."""

from __future__ import annotations

import contextlib
from functools import partial

import torch
from helpers import TINY_VIT, engine_config, peak_cpu_bytes, spawn

from moco_scale.engines import load_engine_config
from moco_scale.models import build_moco
from moco_scale.optim import OptimizerSpec

B = 16
#: deeper and wider than the suite's tiny ViT, so that the model, not fixed buffers, decides the figures
MODEL = dict(TINY_VIT, depth=6, embed_dim=128, moco_mlp_dim=256)


@contextlib.contextmanager
def marked_deepspeed_initialize():
    """Mark where DeepSpeed's own allocations start (its optimizer states and buffers, sized by the config)."""
    import deepspeed

    real = deepspeed.initialize

    def marked(*args, **kwargs):
        with torch.profiler.record_function("deepspeed.initialize"):
            return real(*args, **kwargs)

    deepspeed.initialize = marked
    try:
        yield
    finally:
        deepspeed.initialize = real


def _build(ctx, out: str) -> None:
    rows = {}
    for name in ("fsdp", "zero3", "ddp"):
        cfg = load_engine_config(engine_config(name), B, ctx.world_size).with_precision("fp32")
        whole = build_moco(**MODEL, seed=5)
        want = {k: v.clone() for k, v in whole.state_dict().items()}
        model_bytes = sum(t.numel() * t.element_size() for t in want.values())
        units = [u for part in whole.parts() for u in (*part.blocks, *part.heads)]
        block = max(sum(t.numel() * t.element_size() for t in u.state_dict().values()) for u in units)
        del whole
        meta = build_moco(**MODEL, seed=5, device="meta")
        with marked_deepspeed_initialize():
            engine, peak = peak_cpu_bytes(partial(cfg.build, meta, OptimizerSpec("adamw", 0.1), ctx),
                                          until="deepspeed.initialize")
        got = engine.full_state_dict()
        rows[name] = {"peak": peak, "model": model_bytes, "block": block,
                      "differ": [k for k in want if not torch.equal(got[k].cpu().to(want[k].dtype), want[k])]}
        engine.close()
    torch.save(rows, f"{out}.{ctx.rank}")


def test_sharding_engines_never_hold_the_whole_model_and_start_from_a_cpu_builds_values(tmp_path):
    spawn(_build, 2, str(tmp_path / "rows"))
    for rank in (0, 1):
        rows = torch.load(tmp_path / f"rows.{rank}")
        for name, r in rows.items():
            assert r["differ"] == [], (name, rank, r["differ"][:5])
        for name in ("fsdp", "zero3"):  # ZeRO-3: until deepspeed.initialize allocates its optimizer's state
            r = rows[name]
            assert r["peak"] < r["model"] + r["block"], (name, rank, r)
            assert r["peak"] < 0.75 * r["model"], (name, rank, r)  # about one half (world 2) plus one unit
        # DDP holds the whole model on every rank, as it must: the count sees it
        assert rows["ddp"]["peak"] >= rows["ddp"]["model"], rows["ddp"]
