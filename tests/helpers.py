"""Shared test tools: tiny model settings, real gloo processes, tolerant comparisons."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

TINY_VIT = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, moco_dim=32,
                moco_mlp_dim=64, moco_t=0.2)
TINY_RESNET = dict(arch="resnet_tiny", img_size=32, moco_dim=32, moco_mlp_dim=64, moco_t=1.0)
TINY_VIT_FLAGS = ["-a", "vit_tiny", "--patch-size", "8", "--embed-dim", "64", "--depth", "2", "--num-heads", "4",
                  "--moco-dim", "32", "--moco-mlp-dim", "64", "--moco-t", "0.2"]
#: a one-step tiny run on the built-in data, for tests about what happens around training
COMMON_TINY_RUN = [*TINY_VIT_FLAGS, "-b", "16", "--max-steps", "1", "-j", "0", "--device", "cpu",
                   "--optimizer", "adamw"]


def build_engine(model, optimizer: str, weight_decay: float, cfg, ctx):
    """An engine for `model` (the tests' shorthand for `cfg.build(model, OptimizerSpec(...), ctx)`)."""
    from moco_scale.optim import OptimizerSpec

    return cfg.build(model, OptimizerSpec(optimizer, weight_decay), ctx)


def peak_cpu_bytes(fn, until: str | None = None):
    """fn() and the peak of the CPU bytes it allocated and still held at any point (before the first event named
    `until`, a torch.profiler.record_function marker, where given). Read from the profiler's raw allocation
    records in time order: each is one allocation (positive bytes) or one free (negative). An upper bound where
    other threads free what this one allocated (gloo's workers do): the profiler records this thread's frees only."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = prof.profiler.kineto_results.events()
    stop = min((e.start_ns() for e in events if e.name() == until), default=None)
    records = sorted((e.start_ns(), e.nbytes()) for e in events
                     if e.name() == "[memory]" and e.device_type() == DeviceType.CPU)
    live = peak = 0
    for start, nbytes in records:
        if stop is not None and start >= stop:
            break
        live += nbytes
        peak = max(peak, live)
    return result, peak


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn, args: tuple) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    from moco_scale.dist import init_distributed, shutdown

    ctx = init_distributed("cpu", timeout_s=120)
    try:
        fn(ctx, *args)
    finally:
        shutdown()


def spawn(fn, world: int, *args: Any) -> None:
    """Run fn(ctx, *args) in `world` real processes joined by gloo."""
    mp.start_processes(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True,
                       start_method="spawn")


def rel_err(a: torch.Tensor, b: torch.Tensor, atol: float = 0.0) -> float:
    """||a - b|| / ||b|| per tensor; `atol` (per element, RMS) absorbs values that are rounding noise."""
    a, b = a.double(), b.double()
    diff = max((a - b).norm().item() - atol * b.numel() ** 0.5, 0.0)
    denom = b.norm().item()
    return diff / denom if denom > 0 else diff


def assert_states_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], rtol: float = 1e-5,
                        atol: float = 0.0) -> None:
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    worst = max(((rel_err(got[k], want[k], atol), k) for k in want), default=(0.0, ""))
    assert worst[0] <= rtol, f"{worst[1]} differs by {worst[0]:.2e} (relative)"


def noise_only_elements(state32: dict, state64: dict, init: dict, params: set[str]) -> dict[str, torch.Tensor]:
    """Per parameter, the elements with a zero true gradient: unmoved by the fp64 oracle yet moved in
    fp32, where AdamW turns ~1e-9 rounding noise into lr-sized steps (the final LayerNorm bias feeds
    Linear -> BN; the key third of the qkv bias is softmax-invariant), and their momentum twins."""
    noise = {k: ((state64[k] - init[k].double()).abs() <= 1e-8) & ((state32[k] - init[k]).abs() > 0) for k in params}
    return {k: v for k, v in noise.items() if v.any()}


def assert_matches_oracle(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], init: dict[str, torch.Tensor],
                          params: set[str], noise_only: dict[str, torch.Tensor], fp64: bool = False,
                          exact: dict[str, torch.Tensor] | None = None) -> None:
    """Parameters to 1e-5 relative in fp32 (1e-10 in fp64) outside the noise-only elements, which move
    no further than the oracle's own noise; BN buffers to 1e-3 in fp32; the updates themselves agree.

    With `exact` (the fp64 oracle's result), a tensor on which the fp32 oracle is itself further than
    1e-5 from the exact answer may differ from it by up to 3x that error: no fp32 implementation
    can be asked to be closer to the oracle than the oracle is to the truth."""
    mask = lambda k, t: t.masked_fill(noise_only[k], 0) if k in noise_only else t  # noqa: E731
    rtol = 1e-10 if fp64 else 1e-5
    for k in sorted(params):
        floor = 0.0 if exact is None else 3 * rel_err(mask(k, want[k]), mask(k, exact[k]))
        assert_states_close({k: mask(k, got[k])}, {k: mask(k, want[k])}, rtol=max(rtol, floor),
                            atol=1e-9 if fp64 else 0.0)
    buffers = set(want) - params
    assert_states_close({k: got[k] for k in buffers}, {k: want[k] for k in buffers},
                        rtol=1e-10 if fp64 else 1e-3, atol=1e-9 if fp64 else 1e-7)
    for k, m in noise_only.items():
        assert (got[k] - init[k])[m].abs().max() <= 3 * (want[k] - init[k])[m].abs().max() + 1e-6, k
    for k in params:
        if rel_err(want[k], init[k]) > 1e-4:
            assert rel_err(mask(k, got[k] - init[k]), mask(k, want[k] - init[k])) < 1e-3, k


def assert_losses_close(got: list[float], want: list[float], rtol: float = 1e-5) -> None:
    assert len(got) == len(want), (got, want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert abs(g - w) <= rtol * abs(w), f"step {i + 1}: loss {g} vs {w}"


def run_cli(args: list[str], launcher: list[str] | None = None, timeout: float = 300,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run moco-scale (optionally under a launcher) as a real subprocess; returns the completed process."""
    cmd = (launcher or [str(BIN / "moco-scale")]) + args
    full_env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                "PATH": f"{BIN}:{os.environ.get('PATH', '')}", **(env or {})}
    full_env.pop("RANK", None)
    full_env.pop("WORLD_SIZE", None)
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def torchrun(nproc: int) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
            "-m", "moco_scale", "pretrain"]


def builtin_batches(batch: int, steps: int, dtype: torch.dtype = torch.float32,
                    augment: str = "cpu") -> list[tuple[torch.Tensor, ...]]:
    """The augmented global batches `moco-scale pretrain` sees on the built-in dataset (seed 0,
    crop-min 0.2, 32 px), whatever the world size: augmentation is keyed by image and epoch.
    The loader's part and the device's part run here in one process over the whole global batch."""
    from torch.utils.data import default_collate

    from moco_scale.data import GlobalBatchSampler, pretrain_dataset

    ds = pretrain_dataset(None, 32, 0.2, seed=0, augment=augment)
    batches = []
    for keys in GlobalBatchSampler(len(ds), batch, 1, 0, seed=0):
        views = ds.on_device((ds.collate or default_collate)([ds[k] for k in keys]))
        batches.append(tuple(v.to(dtype) for v in views))
        if len(batches) == steps:
            return batches
    return batches


def read_run(path: Path) -> tuple[list[float], dict[str, torch.Tensor], dict]:
    """Losses from metrics.jsonl and the state dict (without 'module.') of DIR/checkpoint.pth.tar."""
    losses = [json.loads(line)["loss"] for line in open(path / "metrics.jsonl")]
    ckpt = torch.load(path / "checkpoint.pth.tar", weights_only=True)
    return losses, {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}, ckpt


def image_folder(root: Path, good: int, broken: int = 0, classes: tuple[str, ...] = ("a",)) -> Path:
    """An ImageFolder at root/train with `good` small PNGs per class and `broken` unreadable ones in the last."""
    from PIL import Image

    for c in classes:
        (root / "train" / c).mkdir(parents=True)
        for i in range(good):
            Image.new("RGB", (36, 36), (30 * i % 256, 20, 90)).save(root / "train" / c / f"{i}.png")
    for i in range(broken):
        (root / "train" / classes[-1] / f"broken{i}.png").write_bytes(b"not a png")
    return root


def engine_config(name: str) -> str:
    return str(REPO / "ds_configs" / f"{name}.json")


def deepspeed_launcher(nproc: int) -> list[str]:
    return [str(BIN / "deepspeed"), "--num_gpus", str(nproc), "--master_port", str(free_port()),
            "--module", "moco_scale", "pretrain"]


class OpCounter(TorchDispatchMode):
    """What the dispatcher sees of host syncs and communication inside a `with` block: `syncs` counts
    `aten._local_scalar_dense` (the op behind .item(), bool(), float() of a tensor) and device-to-host copies;
    `collectives` lists (op name, elements, bytes per element) of the largest tensor of each c10d op."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: list[str] = []
        self.collectives: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default:
            self.syncs.append("_local_scalar_dense")
        elif func.namespace in ("c10d", "_c10d_functional"):
            tensors = [t for a in args for t in (a if isinstance(a, list | tuple) else [a])
                       if isinstance(t, torch.Tensor)]
            big = max(tensors, key=torch.Tensor.numel)
            self.collectives.append((func.overloadpacket.__name__, big.numel(), big.element_size()))
        elif func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            src = args[1] if func is torch.ops.aten.copy_.default else args[0]
            dst = args[0].device if func is torch.ops.aten.copy_.default else kwargs.get("device") or src.device
            if isinstance(src, torch.Tensor) and torch.device(dst).type == "cpu" and src.device.type != "cpu":
                self.syncs.append(f"copy {src.device} -> {dst}")
        return func(*args, **kwargs)
