#!/usr/bin/env python
"""Benchmark (not a test): MoCo v3 step time on CPU, against the plain step of tests/reference.py.

    .venv/bin/python scripts/bench_step.py [--steps 8] [--models tiny,vit_small] [--worlds 1,2] [--compile]
    .venv/bin/python scripts/bench_step.py --no-parity --worlds 0 --compile    # compile against eager only

- `x plain`: at world 1, moco-scale's DDP engine step against a plain single-process step (bench_common's
  PlainStep: the reference's call order, torch's default AdamW, no engine) for the same model,
  batch and threads. Both live in one process and their steps alternate, so a machine whose speed drifts
  (a shared 2-core VM) slows both alike; the ratio is the median of the step-by-step ratios. Measured twice:
  with glibc's allocator defaults, and with moco-scale's setting (`dist.keep_freed_memory`, which any CPU
  run of moco-scale makes at start) for both.
- world rows: the engine step at each world size (gloo, each rank one thread per core it owns).
- `--compile`: per-block torch.compile (`"compile": true`) against eager at world 1, alternating the same
  way; compile time is the compiled engine's first step over an eager step.

Synthetic inputs, fp32, AdamW; medians over `--steps` steps after a warm-up step.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable

import torch
import torch.multiprocessing as mp
from bench_common import PlainStep, engine_for, free_port

from moco_scale.train.steps import run_steps

MODELS = {
    # name: (build_moco kwargs, global batch)
    "tiny": (dict(arch="vit_tiny", img_size=32, patch_size=4, embed_dim=128, depth=4, num_heads=4, moco_dim=128,
                  moco_mlp_dim=512, moco_t=0.2), 64),
    "vit_small": (dict(arch="vit_small", img_size=224, moco_t=0.2), 8),
}
Step = Callable[[torch.Tensor, torch.Tensor], object]


def plain_step(kwargs: dict, batch: int) -> Step:
    return PlainStep(kwargs)


def engine_step(kwargs: dict, ctx, compiled: bool = False) -> Step:
    from moco_scale.engines import DDPConfig

    engine = engine_for(kwargs, DDPConfig(compile=compiled), ctx)
    return lambda x1, x2: run_steps(engine, [(x1, x2)])


def timed(step: Step, x1: torch.Tensor, x2: torch.Tensor) -> float:
    t = time.perf_counter()
    step(x1, x2)
    return time.perf_counter() - t


def inputs(name: str, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    kwargs, batch = MODELS[name]
    b, size = batch // world, kwargs["img_size"]
    return torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)


def alternate(a: Step, b: Step, x1: torch.Tensor, x2: torch.Tensor, steps: int) -> dict[str, float]:
    """a and b one step each in turn, after a warm-up step each (its time kept: the compile)."""
    first = [timed(a, x1, x2), timed(b, x1, x2)]
    pairs = [(timed(a, x1, x2), timed(b, x1, x2)) for _ in range(steps)]
    return {"a": statistics.median(p[0] for p in pairs), "b": statistics.median(p[1] for p in pairs),
            "ratio": statistics.median(p[0] / p[1] for p in pairs), "a_first": first[0], "b_first": first[1]}


def pair_worker(_: int, name: str, what: str, steps: int, out: str) -> None:
    """One process: `what` is "plain" (engine vs plain step, glibc defaults), "plain+" (the same with
    moco-scale's allocator setting) or "compile" (compiled vs eager engine)."""
    from moco_scale.dist import DistContext, keep_freed_memory

    torch.set_num_threads(os.cpu_count() or 1)
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))  # no group, no set-up: the allocator is left to `what`
    if what != "plain":
        keep_freed_memory()
    if what == "compile":  # a cold compile, as a run's first: no kernels cached by an earlier run
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="bench_step_inductor_")
    kwargs, batch = MODELS[name]
    x1, x2 = inputs(name, 1)
    if what == "compile":
        got = alternate(engine_step(kwargs, ctx, compiled=True), engine_step(kwargs, ctx), x1, x2, steps)
    else:
        got = alternate(engine_step(kwargs, ctx), plain_step(kwargs, batch), x1, x2, steps)
    with open(out, "w") as f:
        json.dump(got, f)


def world_worker(rank: int, world: int, port: int, name: str, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from moco_scale.dist import init_distributed, shutdown

    ctx = init_distributed("cpu")
    step = engine_step(MODELS[name][0], ctx)
    x1, x2 = inputs(name, world)
    timed(step, x1, x2)
    times = [timed(step, x1, x2) for _ in range(steps)]
    if ctx.is_main:
        with open(out, "w") as f:
            json.dump({"step": statistics.median(times)}, f)
    shutdown()


def spawned(fn, nprocs: int, *args) -> dict[str, float]:
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        mp.start_processes(fn, args=(*args, f.name), nprocs=nprocs, start_method="spawn")
        return json.load(open(f.name))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--models", default="tiny,vit_small")
    p.add_argument("--worlds", default="1,2")
    p.add_argument("--compile", action="store_true", help="also time per-block torch.compile at world 1")
    p.add_argument("--no-parity", action="store_true", help="skip the comparison with the plain step")
    args = p.parse_args()
    names = args.models.split(",")
    parity = {} if args.no_parity else {(n, w): spawned(pair_worker, 1, n, w, args.steps)
                                        for n in names for w in ("plain", "plain+")}
    worlds = {(n, w): spawned(world_worker, w, w, free_port(), n, args.steps)
              for n in names for w in map(int, args.worlds.split(",")) if w}
    compiled = {n: spawned(pair_worker, 1, n, "compile", args.steps) for n in names} if args.compile else {}

    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, fp32, AdamW, median of {args.steps} steps; "
          "an image is two crops")
    if parity:
        print("\nworld 1, moco-scale's step against the plain step, alternating in one process:")
        print("| model | global batch | allocator | moco-scale step (s) | plain step (s) | x plain |")
        print("|---|---|---|---|---|---|")
    for (name, what), r in parity.items():
        allocator = "glibc defaults" if what == "plain" else "keep_freed_memory"
        print(f"| {name} | {MODELS[name][1]} | {allocator} | {r['a']:.3f} | {r['b']:.3f} | **{r['ratio']:.2f}** |")
    if worlds:
        print("\nmoco-scale's step per world size (gloo; its own process per rank, moco-scale's set-up):")
        print("| model | world | global batch | step time (s) | images/s |\n|---|---|---|---|---|")
    for (name, world), r in worlds.items():
        batch = MODELS[name][1]
        print(f"| {name} | {world} | {batch} | {r['step']:.3f} | {batch / r['step']:.1f} |")
    if compiled:
        print("\nper-block torch.compile (inductor) against eager at world 1, alternating in one process:")
        print("| model | global batch | eager step (s) | compiled step (s) | x eager | compile time (s) |")
        print("|---|---|---|---|---|---|")
        for name, r in compiled.items():
            print(f"| {name} | {MODELS[name][1]} | {r['b']:.3f} | {r['a']:.3f} | {r['ratio']:.2f} "
                  f"| {r['a_first'] - r['b']:.1f} |")


if __name__ == "__main__":
    main()
