#!/usr/bin/env python
"""Benchmark (not a test): MoCo v3 step time and images/s on CPU at world 1 and 2 (gloo).

    .venv/bin/python scripts/bench_step.py [--steps 5] [--models tiny,vit_small]

Each rank uses one thread per core it owns; synthetic inputs, fp32, DDP engine, AdamW.
"""

from __future__ import annotations

import argparse
import os
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


def worker(rank: int, world: int, port: int, name: str, steps: int, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from moco_scale import build_moco
    from moco_scale.dist import init_distributed, shutdown
    from moco_scale.engines import build_engine, load_engine_config

    ctx = init_distributed("cpu")
    kwargs, batch = MODELS[name]
    torch.manual_seed(0)
    engine = build_engine(build_moco(**kwargs), "adamw", 0.1, load_engine_config(None), ctx)
    b, size = batch // world, kwargs["img_size"]
    x1, x2 = torch.randn(b, 3, size, size), torch.randn(b, 3, size, size)
    engine.train_step(x1, x2, 1e-4, 0.99)  # warm-up
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.train_step(x1, x2, 1e-4, 0.99)
        times.append(time.perf_counter() - t)
    if ctx.is_main:
        with open(out, "w") as f:
            f.write(repr(sorted(times)[len(times) // 2]))
    shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--models", default="tiny,vit_small")
    p.add_argument("--worlds", default="1,2")
    args = p.parse_args()
    rows = []
    for name in args.models.split(","):
        for world in map(int, args.worlds.split(",")):
            with tempfile.NamedTemporaryFile() as f:
                mp.start_processes(worker, args=(world, free_port(), name, args.steps, f.name), nprocs=world,
                                   start_method="spawn")
                step = float(open(f.name).read())
            batch = MODELS[name][1]
            rows.append((name, world, batch, step, batch / step))
    print(f"\nCPU: {os.cpu_count()} cores, torch {torch.__version__}, fp32, DDP engine, median of {args.steps} steps")
    print("| model | world | global batch | step time (s) | images/s |\n|---|---|---|---|---|")
    for name, world, batch, step, ips in rows:
        print(f"| {name} | {world} | {batch} | {step:.3f} | {ips:.1f} |")


if __name__ == "__main__":
    main()
