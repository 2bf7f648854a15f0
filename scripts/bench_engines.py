"""Benchmark: every engine config at one world size, a table of speed and of where the memory goes.

    python scripts/bench_engines.py                       # world 2 on CPU, a small ViT
    python scripts/bench_engines.py --device cuda --world 1 --arch vit_small --image-size 224 -b 64

Per config: median step time, images/s, peak memory per rank (CUDA: max allocated; CPU: peak RSS of
the process, which includes torch itself), and the bytes each rank holds of parameters, gradients
and optimizer state (fp32 masters and the momentum encoder's fp32 copy included), counted from the
tensors themselves (each storage once), each also as a ratio to DDP.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp
from bench_common import engine_for, free_port

REPO = Path(__file__).resolve().parents[1]
CONFIGS = ["ddp", "fsdp", "fsdp_grad_op", "zero0", "zero1", "zero2", "zero3", "zero3_offload"]


def _storages(tensors) -> dict[int, int]:
    out = {}
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor) or t.device.type == "meta":
            continue
        if hasattr(t, "to_local"):
            t = t.to_local()
        s = t.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    return out


def _walk(obj, depth: int = 0):
    """Every tensor reachable from a DeepSpeed optimizer's attributes (its flat partitions and buffers)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif depth < 4 and isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _walk(x, depth + 1)
    elif depth < 4 and isinstance(obj, dict):
        for x in obj.values():
            yield from _walk(x, depth + 1)


def count_bytes(engine) -> dict[str, int]:
    """Model-state bytes this rank holds, by kind, each storage once (in the first kind that holds it);
    call between backward and step, while gradients are alive."""
    params = engine.model.parameters
    kinds = {
        "params": _storages(p.ds_tensor if hasattr(p, "ds_tensor") else p for p in params()),
        "grads": _storages(p.grad for p in params()),
        "optimizer": _storages(_walk(list(engine.optimizer.state.values()))),
        "momentum_fp32": _storages(getattr(getattr(engine, "momentum", None), "m32", None) or []),
    }
    ds_opt = getattr(engine, "_ds_optimizer", None)
    if ds_opt is not None:  # DeepSpeed: fp32 masters, gradient partitions and buffers live on its wrapper
        for name, value in vars(ds_opt).items():
            kinds["grads" if "grad" in name or "ipg" in name else "optimizer"].update(_storages(_walk(value)))
    out, seen = {}, set()
    for kind, storages in kinds.items():
        out[kind] = sum(v for k, v in storages.items() if k not in seen)
        seen |= set(storages)
    return out


def worker(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR=os.environ.get(
                          "DS_ACCELERATOR", "cpu" if args.device == "cpu" else "cuda"))
    from moco_scale.dist import init_distributed, shutdown
    from moco_scale.engines import load_engine_config
    from moco_scale.train.steps import run_steps

    ctx = init_distributed(args.device, 600, require_group=True)
    cfg = load_engine_config(str(REPO / "ds_configs" / f"{args.config}.json"), args.batch, world)
    if args.precision:
        cfg = cfg.with_precision(args.precision)
    if args.activation_checkpointing is not None:
        cfg = cfg.replace(activation_checkpointing=args.activation_checkpointing)
    kwargs = dict(arch=args.arch, img_size=args.image_size, patch_size=args.patch_size, embed_dim=args.embed_dim,
                  depth=args.depth, num_heads=args.num_heads, moco_dim=256, moco_mlp_dim=args.mlp_dim, moco_t=0.2)
    engine = engine_for(kwargs, cfg, ctx)
    b = args.batch // world
    x1 = torch.randn(b, 3, args.image_size, args.image_size, device=ctx.device)
    x2 = torch.randn(b, 3, args.image_size, args.image_size, device=ctx.device)
    counted = {}

    def count(t: int) -> None:  # after one optimizer step, so the optimizer state exists
        if t == 1:
            counted.update(count_bytes(engine))

    steps = run_steps(engine, [(x1, x2)] * (args.warmup + args.steps), after_backward=count)[args.warmup:]
    step_s = statistics.median(s.seconds for s in steps)
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"config": args.config, "precision": engine.precision, "step_s": step_s, "img_s": args.batch / step_s,
           "peak_mib": peak, **counted}
    rows = [None] * world
    torch.distributed.all_gather_object(rows, row)
    if ctx.is_main:
        Path(out).write_text(json.dumps(rows))
    engine.close()
    shutdown()


def run_config(args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "row.json")
        mp.start_processes(worker, args=(args.world, free_port(), args, out), nprocs=args.world, join=True,
                           start_method="spawn")
        rows = json.loads(Path(out).read_text())
    row = dict(rows[0])
    row["peak_mib"] = max(r["peak_mib"] for r in rows)
    for key in ("params", "grads", "optimizer", "momentum_fp32"):
        row[key] = max(r[key] for r in rows)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS)
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--precision", default=None, choices=("fp32", "bf16"), help="override the configs' precision")
    p.add_argument("--activation-checkpointing", type=int, default=None)
    p.add_argument("-a", "--arch", default="vit_small")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--patch-size", type=int, default=4)
    p.add_argument("--embed-dim", type=int, default=192)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--num-heads", type=int, default=3)
    p.add_argument("--mlp-dim", type=int, default=1024)
    p.add_argument("-b", "--batch", type=int, default=64, help="global batch")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (at least 2: bytes are counted in the second)")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.device == "cpu":
        os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // args.world)))
    print(f"# bench_engines: {args.arch} {args.image_size}px patch {args.patch_size} dim {args.embed_dim} depth "
          f"{args.depth}, global batch {args.batch}, world {args.world} on {args.device}, median of {args.steps}")
    rows = []
    for config in args.configs:
        rows.append(run_config(argparse.Namespace(**{**vars(args), "config": config})))
        print(f"  done {config}: {rows[-1]['step_s']:.3f} s/step", file=sys.stderr, flush=True)
    base = next((r for r in rows if r["config"] == "ddp"), rows[0])
    state = lambda r: r["params"] + r["grads"] + r["optimizer"] + r["momentum_fp32"]  # noqa: E731
    mib = 2**20
    print("| config | precision | step s | x DDP | img/s | peak MiB/rank | params MiB | grads MiB | optim MiB "
          "| momentum fp32 MiB | model state MiB/rank | x DDP |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['config']} | {r['precision']} | {r['step_s']:.3f} | {r['step_s'] / base['step_s']:.2f} "
              f"| {r['img_s']:.1f} | {r['peak_mib']:.0f} | {r['params'] / mib:.1f} | {r['grads'] / mib:.1f} "
              f"| {r['optimizer'] / mib:.1f} | {r['momentum_fp32'] / mib:.1f} | {state(r) / mib:.1f} "
              f"| {state(r) / state(base):.3f} |")


if __name__ == "__main__":
    main()
