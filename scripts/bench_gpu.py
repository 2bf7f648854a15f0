"""Benchmark on one GPU (world 1, in one process): pretraining step time, images/s, MFU and peak
memory for ViT-S/16 and ViT-B/16 in bf16, per engine, per-GPU batch and activation checkpointing.

    python scripts/bench_gpu.py --engines ddp_bf16 fsdp zero3 --batches 64 128 256

MFU = model FLOPs of one step (moco_scale.flops: counted by torch.utils.flop_counter from the
model's shapes: base encoder forward and backward on both views, heads, momentum encoder forward;
recomputation not counted) / step time / the GPU's dense bf16 peak (known for A100, H100, H200,
V100; otherwise MFU is left out). The same figure the training run logs as `mfu`.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from moco_scale import build_moco  # noqa: E402
from moco_scale.dist import init_distributed  # noqa: E402
from moco_scale.engines import build_engine, load_engine_config  # noqa: E402
from moco_scale.flops import peak_tflops, step_flops_per_image  # noqa: E402


def measure(engine_name: str, arch: str, batch: int, size: int, ac: int, ctx, steps: int) -> dict:
    cfg = load_engine_config(str(REPO / "ds_configs" / f"{engine_name}.json"), batch, 1)
    cfg["activation_checkpointing"] = ac
    if cfg["engine"] == "deepspeed":
        cfg["deepspeed"]["bf16"] = {"enabled": True}
    else:
        cfg["precision"] = "bf16"
    torch.manual_seed(0)
    model = build_moco(arch, img_size=size, moco_dim=256, moco_mlp_dim=4096, moco_t=0.2)
    torch.cuda.reset_peak_memory_stats()
    engine = build_engine(model, "adamw", 0.1, cfg, ctx)
    x1 = torch.randn(batch, 3, size, size, device="cuda")
    x2 = torch.randn(batch, 3, size, size, device="cuda")
    times = []
    try:
        for i in range(2 + steps):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.train_step(x1, x2, 1e-4, 0.99)
            torch.cuda.synchronize()
            if i >= 2:
                times.append(time.perf_counter() - start)
        return {"step_s": statistics.median(times), "peak_gib": torch.cuda.max_memory_allocated() / 2**30}
    finally:
        engine.close()
        del engine, model
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["ddp_bf16", "fsdp", "zero2", "zero3"])
    p.add_argument("--archs", nargs="+", default=["vit_small", "vit_base"])
    p.add_argument("--batches", nargs="+", type=int, default=[64, 128, 256])
    p.add_argument("--ac", nargs="+", type=int, default=[0, 1], help="activation checkpointing: 0 off, 1 every block")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    ctx = init_distributed("cuda", 600, require_group=True)
    peak_t = peak_tflops(ctx.device, "bf16")
    peak = peak_t * 1e12 if peak_t else None
    print(f"# bench_gpu: {torch.cuda.get_device_name()}, bf16, {args.image_size}px, median of {args.steps} steps, "
          f"peak bf16 {peak_t or float('nan'):.0f} TFLOP/s")
    print("| arch | engine | batch/GPU | act. ckpt | step s | img/s | TFLOP/s | MFU | peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for arch in args.archs:
        for batch in args.batches:
            flops = batch * step_flops_per_image({"arch": arch, "img_size": args.image_size})["train"]
            for engine_name in args.engines:
                for ac in args.ac:
                    try:
                        r = measure(engine_name, arch, batch, args.image_size, ac, ctx, args.steps)
                    except torch.OutOfMemoryError:
                        gc.collect()
                        torch.cuda.empty_cache()
                        print(f"| {arch} | {engine_name} | {batch} | {ac} | OOM | | | | |", flush=True)
                        continue
                    tflops = flops / r["step_s"] / 1e12
                    mfu = f"{tflops * 1e12 / peak:.1%}" if peak else "n/a"
                    print(f"| {arch} | {engine_name} | {batch} | {ac} | {r['step_s']:.3f} | "
                          f"{batch / r['step_s']:.0f} | {tflops:.0f} | {mfu} | {r['peak_gib']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
