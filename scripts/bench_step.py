#!/usr/bin/env python
"""Benchmark (not a test): MoCo v3 step time on CPU, against the plain step of tests/reference.py.

    .venv/bin/python scripts/bench_step.py [--steps 5] [--models tiny,vit_small] [--worlds 1,2] [--compile]

Per model: moco-scale's DDP engine step at each world size (gloo, each rank one thread per core it owns),
and at world 1 the oracle's plain single-process step (tests/reference.py: the reference's call order,
torch's default AdamW, no engine) for the same model, batch and threads; `x plain` is their ratio. The plain
step runs twice: in a plain process (glibc's defaults) and with moco-scale's allocator setting
(`dist.keep_freed_memory`), which any CPU run of moco-scale gets.
`--compile` adds per-block torch.compile (`"compile": true`) at world 1: compile time (the first step's
time over an eager step) and the compiled step. Synthetic inputs, fp32, AdamW; median of `--steps` (`--best`:
the fastest, steadier on a shared machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.multiprocessing as mp

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
from helpers import free_port  # noqa: E402

MODELS = {
    # name: (build_moco kwargs, global batch)
    "tiny": (dict(arch="vit_tiny", img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, moco_dim=128,
                  moco_mlp_dim=512, moco_t=0.2), 64),
    "vit_small": (dict(arch="vit_small", img_size=224, moco_t=0.2), 8),
}


def _plain_step(kwargs: dict, batch: int):
    from reference import Oracle

    from moco_scale import build_moco

    model = build_moco(**kwargs)
    oracle = Oracle(model.base_encoder, model.momentum_encoder, model.predictor, T=model.temperature,
                    optimizer="adamw", base_lr=1.5e-4, wd=0.1, batch=batch, epochs=100, warmup=10, m0=0.99,
                    m_cos=True, iters_per_epoch=1000)
    return oracle.step


def _engine_step(kwargs: dict, compiled: bool, ctx):
    from moco_scale import build_moco
    from moco_scale.engines import build_engine, load_engine_config

    cfg = {**load_engine_config(None), "compile": compiled}
    engine = build_engine(build_moco(**kwargs), "adamw", 0.1, cfg, ctx)
    return lambda x1, x2: engine.train_step(x1, x2, 1e-4, 0.99)


def worker(rank: int, world: int, port: int, name: str, mode: str, steps: int, best: bool, out: str) -> None:
    """Times `steps` steps of `mode` (plain, eager, compiled) after one warm-up step (timed apart)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from moco_scale.dist import DistContext, init_distributed, keep_freed_memory, shutdown

    kwargs, batch = MODELS[name]
    torch.manual_seed(0)
    if mode.startswith("plain"):  # a plain process: no moco-scale set-up, unless "plain+" (its allocator setting)
        ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
        if mode == "plain+":
            keep_freed_memory()
        step = _plain_step(kwargs, batch)
    else:
        ctx = init_distributed("cpu")
        step = _engine_step(kwargs, mode == "compiled", ctx)
    b, size = batch // world, kwargs["img_size"]
    x1, x2 = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    t = time.perf_counter()
    step(x1, x2)  # warm-up: allocator, first-touch, and the compile
    first = time.perf_counter() - t
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step(x1, x2)
        times.append(time.perf_counter() - t)
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump({"first": first, "step": min(times) if best else statistics.median(times)}, f)
    shutdown()


def measure(name: str, mode: str, world: int, steps: int, best: bool) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(worker, args=(world, free_port(), name, mode, steps, best, f.name), nprocs=world,
                           start_method="spawn")
        return json.load(open(f.name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="tiny,vit_small")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--compile", action="store_true", help="also time per-block torch.compile at world 1")
    p.add_argument("--best", action="store_true", help="the fastest step instead of the median (a shared machine)")
    args = p.parse_args()
    rows, compile_rows = [], []
    for name in args.models.split(","):
        batch = MODELS[name][1]
        plain = [measure(name, mode, 1, args.steps, args.best)["step"] for mode in ("plain", "plain+")]
        eager_world1 = None
        for world in map(int, args.worlds.split(",")):
            got = measure(name, "eager", world, args.steps, args.best)
            eager_world1 = got if world == 1 else eager_world1
            rows.append((name, world, batch, got["step"], batch / got["step"], plain if world == 1 else None))
        if args.compile:
            eager = eager_world1 or measure(name, "eager", 1, args.steps, args.best)
            got = measure(name, "compiled", 1, args.steps, args.best)
            compile_rows.append((name, batch, eager["step"], got["step"], got["first"] - eager["step"]))
    stat = "fastest" if args.best else "median"
    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, fp32, AdamW, {stat} of {args.steps} steps; "
          "an image is two crops")
    print("| model | world | global batch | step time (s) | images/s | plain step (s) | x plain "
          "| plain step, moco-scale's allocator setting (s) | x that |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, world, batch, step, ips, plain in rows:
        ratio = " | ".join(f"{p:.3f} | **{step / p:.2f}**" for p in plain) if plain else "- | - | - | -"
        print(f"| {name} | {world} | {batch} | {step:.3f} | {ips:.1f} | {ratio} |")
    if compile_rows:
        print("\nper-block torch.compile (inductor) at world 1:")
        print("| model | global batch | eager step (s) | compiled step (s) | x eager | compile time (s) |")
        print("|---|---|---|---|---|---|")
        for name, batch, eager, compiled, compile_s in compile_rows:
            print(f"| {name} | {batch} | {eager:.3f} | {compiled:.3f} | {compiled / eager:.2f} | {compile_s:.1f} |")


if __name__ == "__main__":
    main()
