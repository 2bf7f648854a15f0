"""The CUDA-path defects found by reading, each where its property shows on the CPU (in-process, no launcher)."""

from __future__ import annotations

import collections
import os

import pytest
import torch
from helpers import TINY_VIT, build_engine, engine_config
from torch.utils._python_dispatch import TorchDispatchMode

from moco_scale import build_moco
from moco_scale.commands.plan import gpu_precision
from moco_scale.config import ConfigError
from moco_scale.dist import cuda_ordinal, init_distributed, loader_workers, shutdown
from moco_scale.engines import load_engine_config
from moco_scale.engines.base import resolve_precision
from moco_scale.engines.deepspeed_momentum import BatchedCopy
from moco_scale.loss import contrastive_loss
from moco_scale.models import SyncBatchNorm

MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default}


class MatmulDtypes(TorchDispatchMode):
    """Counts matrix products by the dtype of their first operand."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in MATMULS:
            self.counts[args[-2].dtype if func is torch.ops.aten.addmm.default else args[0].dtype] += 1
        return func(*args, **(kwargs or {}))


class Casts(TorchDispatchMode):
    """Shapes of the tensors cast to another dtype."""

    def __init__(self) -> None:
        super().__init__()
        self.shapes: list[tuple[int, ...]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._to_copy.default:
            self.shapes.append(tuple(args[0].shape))
        return func(*args, **(kwargs or {}))


def test_logits_are_fp32_under_autocast():
    """Under bf16 autocast `q @ k.t()` ran in bf16 despite the fp32 casts; the loss switches autocast off."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    want = contrastive_loss(q.double(), k.double(), 0.2)
    mode = MatmulDtypes()
    with torch.autocast("cpu", dtype=torch.bfloat16), mode:
        got = contrastive_loss(q.bfloat16(), k.bfloat16(), 0.2)
    assert got.dtype == torch.float32
    assert set(mode.counts) == {torch.float32}, mode.counts
    # bf16 logits would be off by ~1e-2; fp32 logits of the bf16-rounded inputs are within their rounding
    assert abs(got.item() - want.item()) < 2e-2 * abs(want.item())
    assert abs(got.item() - contrastive_loss(q.bfloat16().float(), k.bfloat16().float(), 0.2).item()) < 1e-5


@pytest.fixture(scope="module")
def ctx():
    """One plain process in a group of one (what the sharding engines ask for); torn down after the module."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    yield init_distributed("cpu", require_group=True)
    shutdown()


def backward_matmul_dtypes(ctx, chunk: int) -> collections.Counter:
    """The dtypes of the backward's matrix products in one ddp_bf16.json step (world 1, CPU autocast)."""
    cfg = load_engine_config(engine_config("ddp_bf16"), 8, 1)
    cfg = cfg.replace(backbone_chunk=chunk)
    torch.manual_seed(0)
    engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
    x = torch.randn(8, 3, 32, 32)
    loss = engine.forward(x, x)
    mode = MatmulDtypes()
    with mode:
        engine.backward(loss)
    return mode.counts


def test_chunked_recompute_runs_under_the_forwards_autocast(ctx):
    """Backbone chunking recomputes in backward, outside the step's autocast region: it must re-enter it, or a
    bf16 step back-propagates its backbone in fp32. With and without chunking, the same dtypes."""
    plain, chunked = backward_matmul_dtypes(ctx, 0), backward_matmul_dtypes(ctx, 4)
    assert plain[torch.bfloat16] > 0
    assert chunked[torch.bfloat16] >= plain[torch.bfloat16], (plain, chunked)  # recomputation adds bf16 forwards
    assert chunked[torch.float32] == plain[torch.float32], (plain, chunked)  # the loss's fp32 logits only


def test_one_rank_batchnorm_keeps_a_16_bit_input_16_bit():
    """The world-1 path cast every BN input to fp32; now only 16-bit weights are brought to the fp32 statistics."""
    torch.manual_seed(0)
    x = torch.randn(16, 32).bfloat16()
    bn = SyncBatchNorm(32).bfloat16()  # a sharding engine's 16-bit weights...
    bn.running_mean, bn.running_var = bn.running_mean.float(), bn.running_var.float()  # ...and fp32 statistics
    mode = Casts()
    with mode:
        y = bn(x)
    assert y.dtype == torch.bfloat16
    assert (16, 32) not in mode.shapes, mode.shapes  # the input was not copied to another dtype
    assert bn.running_mean.dtype == torch.float32
    want = torch.nn.functional.batch_norm(x.float(), None, None, None, None, True)
    torch.testing.assert_close(y.float(), want, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("total,local,want", [(32, 8, 4), (32, 1, 32), (10, 4, 3), (0, 8, 0)])
def test_workers_are_split_per_node_not_over_the_world(total, local, want):
    """-j counts one node's workers, as in the reference: 64 GPUs on 8 nodes with -j 32 get 4 each."""
    assert loader_workers(total, local) == want


@pytest.mark.parametrize("local_rank,count,want", [(0, 8, 0), (5, 8, 5), (5, 1, 0), (3, 2, 1)])
def test_cuda_ordinal_under_one_visible_gpu_per_task(local_rank, count, want):
    """SLURM with one GPU visible per task: local rank 5 sees one device, ordinal 0 (set_device(5) is invalid)."""
    assert cuda_ordinal(local_rank, count) == want


def test_precision_auto_is_one_rule_for_every_engine():
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", gpu, bf16_supported=True) == "bf16"
    assert resolve_precision("auto", gpu, bf16_supported=False) == "fp16"  # a V100: the reference's fp16
    assert resolve_precision("fp16", gpu, bf16_supported=True) == "fp16"  # reachable by config
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_precision("fp16", cpu)
    for name in ("ddp", "fsdp", "fsdp_grad_op", "zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        assert gpu_precision(load_engine_config(engine_config(name), 16, 1)) == "bf16", name


def test_deepspeed_fp16_auto_gets_the_references_loss_scaler():
    from moco_scale.engines.deepspeed_config import resolve_config_precision

    cfg = {"bf16": {"enabled": "auto"}}
    assert resolve_config_precision(cfg, torch.device("cpu")) == "fp32" and cfg["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="fp16 .*needs a CUDA device"):
        resolve_config_precision({"fp16": {"enabled": True}}, torch.device("cpu"))


def test_batched_copy_scatters_every_tensor_with_its_cast():
    """The one-transfer copy of the momentum partitions under offload: every destination gets its source, cast."""
    g = torch.Generator().manual_seed(0)
    src = [torch.randn(n, generator=g) for n in (5, 1, 17)]
    dst = [torch.zeros(n, dtype=torch.bfloat16) for n in (5, 1, 17)]
    BatchedCopy(dst, src).run()
    for d, s in zip(dst, src, strict=True):
        assert torch.equal(d, s.bfloat16())
    same = [torch.zeros(n) for n in (5, 1, 17)]
    copy = BatchedCopy(same, src)
    assert not copy.staged
    copy.run()
    assert all(torch.equal(d, s) for d, s in zip(same, src, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a staged copy needs a second device")
def test_batched_copy_stages_through_pinned_memory_to_the_gpu():
    src = [torch.randn(n) for n in (5, 1, 17)]
    dst = [torch.zeros(n, dtype=torch.bfloat16, device="cuda") for n in (5, 1, 17)]
    copy = BatchedCopy(dst, src)
    assert copy.staged and copy.host.is_pinned()
    copy.run()
    torch.cuda.synchronize()
    assert all(torch.equal(d.cpu(), s.bfloat16()) for d, s in zip(dst, src, strict=True))


def test_zero3_finds_deepspeeds_gather_stream(ctx):
    """The momentum write is ordered before ZeRO-3's all-gather stream reads it: the engine finds that stream
    (None on the CPU, a synchronised device) and fails loudly if a DeepSpeed version moved it."""
    cfg = load_engine_config(engine_config("zero3"), 8, 1)
    engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
    try:
        assert engine.momentum.gather_stream is None
        x = torch.randn(8, 3, 32, 32)
        assert torch.isfinite(engine.train_step((x, x), 1e-3, 0.99))
    finally:
        engine.close()
