"""The step's hot path, seen by the dispatcher in real gloo processes at world 2: no host sync on a step that does
not log (every engine), LARS's norms in one collective under FSDP, FSDP's prefetch plan, ZeRO 1-2's momentum
rebuilt by an all-gather.

One launch runs every check (launches dominate the suite's time); the tests read its record."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, OpCounter, build_engine, engine_config, spawn

from moco_scale import build_moco
from moco_scale.dist import DistContext, StopRequest, mean_across_ranks
from moco_scale.engines import load_engine_config

ENGINES = ["ddp", "fsdp", "zero0", "zero1", "zero2", "zero3"]
B = 8
#: DeepSpeed 0.19's own host syncs, which no config turns off: ZeRO-1/2 in fp32 and ZeRO-3 test the global
#: gradient norm for inf/NaN with bool() in every step (stage_1_and_2.py / stage3.py `is_invalid_grad_norm`)
DEEPSPEED_OWN = {"zero1": 1, "zero3": 1}


def build(ctx: DistContext, config: str, optimizer: str = "adamw", precision: str = "fp32", **vit):
    torch.manual_seed(0)
    cfg = load_engine_config(engine_config(config), B, ctx.world_size).with_precision(precision)
    return build_engine(build_moco(**{**TINY_VIT, **vit}), optimizer, 0.1, cfg, ctx)


def fsdp_gathers(engine, x1: torch.Tensor, x2: torch.Tensor) -> tuple[dict[str, int], list[str]]:
    """All-gathers per FSDP unit in one step (after a warm-up step), counted where FSDP2 issues them (its
    param group's unshard: a private API, read by this test only); and the units still gathered after it."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup

    counts: dict[str, int] = {}
    real = FSDPParamGroup.unshard

    def unshard(group, *args, **kwargs):
        if group._all_gather_result is None and not group.is_unsharded:
            counts[group._module_fqn or "root"] = counts.get(group._module_fqn or "root", 0) + 1
        return real(group, *args, **kwargs)

    engine.train_step((x1, x2), 1e-3, 0.99)
    FSDPParamGroup.unshard = unshard
    try:
        engine.train_step((x1, x2), 1e-3, 0.99)
    finally:
        FSDPParamGroup.unshard = real
    gathered = [n or "root" for n, m in engine.model.named_modules()
                if isinstance(m, FSDPModule) and m._get_fsdp_state()._fsdp_param_group.is_unsharded]
    return counts, gathered


def record(ctx: DistContext, out: str) -> None:
    g = torch.Generator().manual_seed(ctx.rank)
    x1, x2 = torch.randn(B // 2, 3, 32, 32, generator=g), torch.randn(B // 2, 3, 32, 32, generator=g)
    rec: dict = {"syncs": {}, "logging_syncs": {}}
    stop = StopRequest(ctx)
    for config in ENGINES:
        engine = build(ctx, config)
        for _ in range(3):  # ZeRO-3 records its module trace (with syncs of its own) in the first steps
            engine.train_step((x1, x2), 1e-3, 0.99)
        with OpCounter() as plain:
            engine.train_step((x1, x2), 1e-3, 0.99)
            stop.agreed(may_sync=False)
        with OpCounter() as logging:
            loss = engine.train_step((x1, x2), 1e-3, 0.99, watch=engine.model.first_layer_names())
            mean_across_ranks(loss).item()
            stop.agreed(may_sync=True)
        rec["syncs"][config], rec["logging_syncs"][config] = plain.syncs, logging.syncs
        engine.close()
    stop.close()

    engine = build(ctx, "fsdp")  # the prefetch plan
    names = {m: n or "root" for n, m in engine.model.named_modules()}
    rec["fsdp"] = {f"{way}_prefetch": {
        names[m]: [names[s._modules[0]] for s in getattr(m._get_fsdp_state(), f"_states_to_{way}_prefetch")]
        for m in names if hasattr(m, "_get_fsdp_state")} for way in ("forward", "backward")}
    rec["fsdp"]["gathers"], rec["fsdp"]["left_gathered"] = fsdp_gathers(engine, x1, x2)
    engine.close()

    rec["lars"] = {}
    for depth in (1, 4):  # collectives per LARS step against the number of parameters
        engine = build(ctx, "fsdp", "lars", depth=depth)
        engine.update_momentum(0.99)
        engine.backward(engine.forward(x1, x2))
        with OpCounter() as step:
            engine.step(1e-2)
        rec["lars"][depth] = (len(engine.optimizer.param_groups[0]["params"]), step.collectives)
        engine.close()

    for config in ("zero1", "zero2"):  # 16-bit: the momentum encoder's fp32 fragments, rebuilt by one gather
        engine = build(ctx, config, precision="bf16")
        engine.train_step((x1, x2), 1e-3, 0.99)
        with OpCounter() as update:
            engine.update_momentum(0.9)
        full = [t.clone() for t in engine.momentum.full()]
        module = [m.detach() for m, _ in engine.momentum.pairs]
        rounded = all(torch.equal(m, f.to(m.dtype)) for m, f in zip(module, full, strict=True))
        rec[config] = {"collectives": update.collectives, "numel": sum(t.numel() for t in module),
                       "optimized": sum(p.numel() for p in engine.model.trainable_parameters()),
                       "module_is_rounded_state": rounded}
        engine.close()
    if ctx.is_main:
        torch.save(rec, out)


@pytest.fixture(scope="module")
def seen(tmp_path_factory):
    out = tmp_path_factory.mktemp("hot_path") / "record.pt"
    spawn(record, 2, str(out))
    return torch.load(out)


@pytest.mark.parametrize("config", ENGINES)
def test_a_step_that_does_not_log_never_waits_for_the_device(seen, config):
    assert len(seen["syncs"][config]) == DEEPSPEED_OWN.get(config, 0), seen["syncs"][config]


@pytest.mark.parametrize("config", ENGINES)
def test_a_logging_step_reads_the_expected_few(seen, config):
    # the patch embedding's gradient norm, the mean loss, the stop agreement (and DeepSpeed's own)
    assert len(seen["logging_syncs"][config]) == 3 + DEEPSPEED_OWN.get(config, 0), seen["logging_syncs"][config]


def test_lars_reduces_every_norm_in_one_collective_under_fsdp(seen):
    (n_small, small), (n_big, big) = seen["lars"][1], seen["lars"][4]
    assert n_big > n_small + 20  # four blocks against one: many more parameters
    assert [op for op, _, _ in small] == [op for op, _, _ in big] == ["allreduce_"]
    assert small[0][1] < big[0][1]  # the one all-reduce carries two squared norms per weight matrix


def test_fsdp_prefetches_the_next_unit_in_forward_order(seen):
    got = {k: v for k, v in seen["fsdp"]["forward_prefetch"].items() if v}
    assert got == {"base_encoder.blocks.0": ["base_encoder.blocks.1"], "base_encoder.blocks.1": ["base_encoder.head"],
                   "base_encoder.head": ["predictor"], "predictor": ["momentum_encoder.blocks.0"],
                   "momentum_encoder.blocks.0": ["momentum_encoder.blocks.1"],
                   "momentum_encoder.blocks.1": ["momentum_encoder.head"]}


def test_fsdp_gathers_what_runs_again_soon_once(seen):
    """The base encoder's last block (its backward follows its forward closely), the heads and the predictor
    (run once per view: twice in forward, twice in backward) are gathered once per step; the other base blocks
    and the root once in forward and once in backward; each momentum block once; nothing stays gathered."""
    got = seen["fsdp"]["gathers"]
    assert got["base_encoder.blocks.1"] == got["base_encoder.head"] == got["predictor"] == 1, got
    assert got["base_encoder.blocks.0"] == got["root"] == 2, got
    assert got["momentum_encoder.blocks.0"] == got["momentum_encoder.blocks.1"] == 1, got
    assert got["momentum_encoder.head"] <= 2, got  # 3 when resharded after each of its two no-grad calls
    assert seen["fsdp"]["left_gathered"] == []


def test_fsdp_prefetches_the_previous_block_in_backward_of_the_base_encoder_only(seen):
    got = {k: v for k, v in seen["fsdp"]["backward_prefetch"].items() if v}
    assert got == {"base_encoder.blocks.1": ["base_encoder.blocks.0"]}  # the momentum encoder has no backward


@pytest.mark.parametrize("config", ["zero1", "zero2"])
def test_zero12_momentum_moves_half_the_bytes_of_an_all_reduce(seen, config):
    got, world = seen[config], 2
    (op, elements, size), = got["collectives"]
    assert op == "_allgather_base_" and size == 2  # bf16
    moved = (world - 1) / world * elements * size  # ring all-gather
    all_reduce = 2 * (world - 1) / world * got["numel"] * size  # ring all-reduce of the whole encoder
    # each rank sends its optimizer partition's share of the encoder: the partitions are equal over base encoder
    # and predictor together, so a rank holding more encoder than predictor sends a little more than half
    assert 0.5 <= moved / all_reduce <= 0.5 * got["optimized"] / got["numel"] + 0.01
    assert got["module_is_rounded_state"]  # the weights the forward reads are the fp32 state, rounded
