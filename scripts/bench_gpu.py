"""Benchmark on one GPU (world 1, one process): pretraining step time, images/s, MFU and peak memory per
engine, architecture, per-GPU batch, activation checkpointing and memory format, beside the planner's
estimate of the same setting.

    python scripts/bench_gpu.py --engines ddp_bf16 fsdp zero2 zero3 --archs vit_base vit_small --batches 256 128
    python scripts/bench_gpu.py --archs resnet50 --engines ddp_bf16 --optimizer lars --channels-last 0 1
    python scripts/bench_gpu.py --archs vit_base --engines ddp_bf16 fsdp --batches 256 --ac 0 \
        --variants shipped unfused no_prefetch compiled    # the hot path's parts, one off at a time
    python scripts/bench_gpu.py --tiny --device cpu          # the dry run: tiny shapes, to check the script

MFU = model FLOPs of one step (moco_scale.flops: counted by torch.utils.flop_counter from the model's
shapes: base encoder forward and backward on both views, heads, momentum encoder forward; recomputation
not counted) / step time / peak, against two peaks: this GPU's measured dense bf16 matmul (8192^3, timed
here) and its datasheet figure (known for A100, H100, H200, V100). Every row is its own try; rows past
--budget-s are written as skipped.

Variants (`--variants`), each against the shipped engine: `unfused` (AdamW's foreach implementation instead of
the fused one), `no_prefetch` (FSDP: FSDP2's implicit prefetch instead of the explicit plan), `compiled`
(`"compile": true`: per-block torch.compile; DDP/FSDP only). A variant that does not apply to an engine is
not run.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import statistics

import torch
from bench_common import REPO, TINY, engine_for, init_single, measured_matmul_tflops, peak_gib

from moco_scale import build_moco
from moco_scale.commands.plan import Setup, activation_profile, estimate, model_shapes
from moco_scale.engines import load_engine_config
from moco_scale.flops import peak_tflops, step_flops_per_image
from moco_scale.telemetry import CheckTable
from moco_scale.train.steps import run_steps

_profiles: dict[str, object] = {}


def model_kwargs(arch: str, size: int, tiny: bool) -> dict:
    if tiny:
        return dict(TINY, moco_t=0.2) if arch.startswith("vit") else dict(arch="resnet_tiny", img_size=32,
                                                                          moco_dim=32, moco_mlp_dim=64)
    return dict(arch=arch, img_size=size, moco_dim=256, moco_mlp_dim=4096, moco_t=0.2 if arch.startswith("vit")
                else 1.0)


def planned_gib(kwargs: dict, model, cfg_path: str, batch: int, ac: int, optimizer: str) -> float:
    key = json.dumps(kwargs, sort_keys=True)
    if key not in _profiles:
        _profiles[key] = activation_profile(kwargs)
    e = estimate(kwargs, model_shapes(model), _profiles[key], Setup(cfg_path, 1, ac, 0), batch, "bf16", optimizer)
    return e["total"] / 2**30


VARIANTS = ("shipped", "unfused", "no_prefetch", "compiled")


def applies(variant: str, engine_name: str, optimizer: str) -> bool:
    cfg = load_engine_config(str(REPO / "ds_configs" / f"{engine_name}.json"), 8, 1)
    return {"shipped": True, "unfused": optimizer == "adamw", "no_prefetch": cfg.engine == "fsdp",
            "compiled": cfg.engine in ("ddp", "fsdp")}[variant]


def apply_variant(engine, variant: str) -> None:
    """The variants that change a built engine (compile is its config key)."""
    if variant == "unfused":  # read by AdamW at each step; its state starts at the first one
        for group in engine.optimizer.param_groups:
            group.update(fused=False, foreach=True)
    elif variant == "no_prefetch":
        for module in engine.model.modules():
            if hasattr(module, "set_modules_to_forward_prefetch"):
                module.set_modules_to_forward_prefetch([])
                module.set_modules_to_backward_prefetch([])


def measure(engine_name: str, kwargs: dict, batch: int, ac: int, channels_last: bool, optimizer: str, ctx,
            steps: int, variant: str = "shipped") -> dict:
    cfg_path = str(REPO / "ds_configs" / f"{engine_name}.json")
    cfg = load_engine_config(cfg_path, batch, 1).replace(activation_checkpointing=ac)
    if variant == "compiled":
        cfg = cfg.replace(compile=True)
    cfg = cfg.with_precision("bf16")
    planned = planned_gib(kwargs, build_moco(**kwargs, seed=0, device="meta"), cfg_path, batch, ac, optimizer)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    size = kwargs["img_size"]
    x1 = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=fmt)
    x2 = torch.randn(batch, 3, size, size, device=ctx.device).contiguous(memory_format=fmt)
    engine = engine_for(kwargs, cfg, ctx, optimizer, 0.1 if optimizer == "adamw" else 1e-6,
                        memory_format=fmt if channels_last else None)
    apply_variant(engine, variant)
    try:
        steps = run_steps(engine, [(x1, x2)] * (2 + steps))[2:]
        return {"step_s": statistics.median(s.seconds for s in steps), "peak_gib": peak_gib(ctx.device),
                "planned_gib": planned}
    finally:
        engine.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engines", nargs="+", default=["ddp_bf16", "fsdp", "zero2", "zero3"])
    p.add_argument("--archs", nargs="+", default=["vit_base", "vit_small"])
    p.add_argument("--batches", nargs="+", type=int, default=[256, 128])
    p.add_argument("--ac", nargs="+", type=int, default=[0, 1], help="activation checkpointing: 0 off, 1 every block")
    p.add_argument("--channels-last", nargs="+", type=int, default=[0], help="0/1: the memory format (ResNet)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "lars"))
    p.add_argument("--variants", nargs="+", default=["shipped"], choices=VARIANTS,
                   help="the shipped engine, or it with one part of the hot path off/on (see above)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny shapes (for --dry-run)")
    p.add_argument("--budget-s", type=float, default=float("inf"), help="rows after this many seconds are skipped")
    p.add_argument("--json", default=None, help="also write the measured rows here (bench_data.py reads them)")
    args = p.parse_args()
    ctx = init_single(args.device, 29533)
    matmul = measured_matmul_tflops(ctx.device)
    sheet = peak_tflops(ctx.device, "bf16")
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    shapes = "tiny shapes" if args.tiny else f"{args.image_size} px"
    table = CheckTable(f"bench_gpu: {name}, bf16, {shapes}, median of {args.steps} steps; "
                  f"peak bf16: measured matmul {matmul:.3g} TFLOP/s, datasheet "
                  f"{'n/a' if sheet is None else f'{sheet:.0f}'} TFLOP/s",
                  ["arch", "engine", "variant", "batch/GPU", "act. ckpt", "channels_last", "step s", "img/s", "TFLOP/s",
                   "MFU (measured peak)", "MFU (datasheet)", "peak GiB", "planned GiB"], args.budget_s)
    rows: list[dict] = []

    def run(arch: str, batch: int, engine_name: str, ac: int, cl: int, variant: str) -> list[str]:
        kwargs = model_kwargs(arch, args.image_size, args.tiny)
        r = measure(engine_name, kwargs, batch, ac, bool(cl), args.optimizer, ctx, args.steps, variant)
        tflops = batch * step_flops_per_image(kwargs)["train"] / r["step_s"] / 1e12
        rows.append({"arch": arch, "engine": engine_name, "variant": variant, "batch": batch, "ac": ac,
                     "channels_last": cl, **r, "img_per_s": batch / r["step_s"]})
        return [f"{r['step_s']:.3f}", f"{batch / r['step_s']:.0f}", f"{tflops:.3g}", f"{tflops / matmul:.1%}",
                "n/a" if sheet is None else f"{tflops / sheet:.1%}", r["peak_gib"], f"{r['planned_gib']:.1f}"]

    # the most important rows first: the larger model, the larger batch, every engine before checkpointing
    for arch, batch, ac, engine_name, cl, variant in itertools.product(args.archs, args.batches, args.ac, args.engines,
                                                                       args.channels_last, args.variants):
        if applies(variant, engine_name, args.optimizer):
            table.row([arch, engine_name, variant, batch, ac, cl],
                      functools.partial(run, arch, batch, engine_name, ac, cl, variant))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 1 if table.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
