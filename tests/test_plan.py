"""moco-scale plan: its model-state bytes equal the tensors each engine allocates (counted on every rank at
world 2 and 4), its activation estimate moves the right way, its command line."""

from __future__ import annotations

import pytest
import torch
from helpers import TINY_VIT, build_engine, engine_config, run_cli, spawn

from moco_scale import build_moco
from moco_scale.commands.plan import activation_bytes, activation_profile, model_shapes
from moco_scale.dist import DistContext
from moco_scale.engines import load_engine_config

B = 16


def local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def nbytes(tensors) -> int:
    return sum(local(t).numel() * t.element_size() for t in tensors if t is not None)


def counted(engine) -> dict[str, int]:
    """Model state as the engine holds it: gradients right after backward, optimizer state after the step."""
    model, opt = engine.model, getattr(engine, "_ds_optimizer", None)
    stage = getattr(engine, "stage", None)
    base = [*model.base_encoder.parameters(), *model.predictor.parameters()]
    held = (lambda ps: [p.ds_tensor for p in ps]) if stage == 3 else (lambda ps: ps)
    out = {"parameters": nbytes(held(base)), "momentum": nbytes(held(list(model.momentum_encoder.parameters())))}
    module_storages = {local(t).untyped_storage().data_ptr() for t in held(list(model.momentum_encoder.parameters()))}
    out["momentum"] += nbytes([t for t in getattr(getattr(engine, "momentum", None), "m32", []) or []
                               if t is not None and t.untyped_storage().data_ptr() not in module_storages])
    if stage in (1, 2):
        out["gradients"] = nbytes(g for group in opt.averaged_gradients.values() for g in group)
        masters = opt.single_partition_of_fp32_groups
    elif stage == 3:
        out["gradients"] = nbytes([opt.grad_partitions_flat_buffer])
        masters = opt.fp32_partitioned_groups_flat
    else:
        out["gradients"] = nbytes(p.grad for p in model.trainable_parameters())
        masters = []
    return out, masters


def count_engines(ctx: DistContext, configs, precision: str, out_path) -> None:
    results = {}
    for config in configs:
        cfg = load_engine_config(engine_config(config), B, ctx.world_size)
        if cfg.engine == "deepspeed":
            cfg.deepspeed["bf16"] = {"enabled": precision == "bf16"}
        else:
            cfg = cfg.replace(precision=precision)
        torch.manual_seed(0)
        model = build_moco(**TINY_VIT)
        shapes = model_shapes(model)
        engine = build_engine(model, "adamw", 0.1, cfg, ctx)
        x = torch.randn(B // ctx.world_size, 3, 32, 32)
        engine.update_momentum(0.99)
        engine.backward(engine.forward(x, x))
        got, masters = counted(engine)
        engine.step(1e-3)
        basic = getattr(engine.optimizer, "optimizer", engine.optimizer)
        got["optimizer"] = nbytes(t for s in basic.state.values() for t in s.values() if torch.is_tensor(t))
        got["optimizer"] += nbytes(masters)
        want = cfg.engine_class.state_bytes(shapes, cfg, ctx.world_size, ctx.rank, engine.precision, "adamw")
        results[config] = {"got": got, "want": want}
        engine.close()
    torch.save(results, f"{out_path}.{ctx.rank}")


@pytest.mark.parametrize("world,precision", [(2, "fp32"), pytest.param(4, "fp32", marks=pytest.mark.slow), (2, "bf16")])
def test_planned_model_state_equals_what_the_engines_hold(world, precision, tmp_path):
    configs = ["ddp", "fsdp", "zero1", "zero2", "zero3"] if precision == "fp32" else ["fsdp", "zero1", "zero2", "zero3"]
    spawn(count_engines, world, configs, precision, tmp_path / "counts")
    for rank in range(world):
        for config, r in torch.load(tmp_path / f"counts.{rank}").items():
            assert r["got"] == r["want"], (config, rank, r)
            assert r["got"]["parameters"] > 0 and r["got"]["optimizer"] > 0, (config, r)


def test_activation_estimate_moves_the_right_way():
    profile = activation_profile({**TINY_VIT, "depth": 4})
    plain = activation_bytes(profile, crops=64)
    assert activation_bytes(profile, crops=128) == 2 * plain  # linear in the crops a rank holds
    assert activation_bytes(profile, crops=64, ac_every=1) < activation_bytes(profile, crops=64, ac_every=2) < plain
    assert activation_bytes(profile, crops=64, chunk=8) < activation_bytes(profile, crops=64, chunk=32) < plain
    assert activation_bytes(profile, crops=64, precision="bf16") == plain // 2
    assert all(b > x > 0 for b, x in zip(profile.blocks, profile.block_inputs, strict=True))


def test_plan_command_prints_the_table_and_a_setup_that_fits():
    res = run_cli(["plan", "-a", "vit_small", "-b", "4096", "--nodes", "1", "--gpus-per-node", "8",
                   "--engine-config", engine_config("ddp"), "--image-size", "96", "--gpu-memory", "4"])
    assert res.returncode == 0, res.stderr[-2000:]
    for row in ("parameters", "gradients", "optimizer state", "momentum encoder", "activations", "**total**",
                "sent per GPU per step", "smallest setup that fits"):
        assert row in res.stdout, (row, res.stdout)
    # 1024 crops of ViT-S at 96 px: about 5.4 GiB of activations in 16 bits; chunking fits even one GPU
    assert "does NOT fit" in res.stdout and "smallest setup that fits: 1 GPU(s)" in res.stdout, res.stdout


def test_plan_names_the_flags_of_a_bad_split():
    res = run_cli(["plan", "-b", "100", "--nodes", "3", "--gpus-per-node", "8"])
    assert res.returncode == 2 and "-b 100" in res.stderr and "--nodes 3" in res.stderr, res.stderr


def test_plan_finetune_counts_one_view_and_the_classifier():
    """--finetune plans the classifier (timm's ViT with a 1000-way head, nothing of MoCo's) on one view per image."""
    import dataclasses

    import timm

    from moco_scale import build_moco
    from moco_scale.commands.plan import Setup, _classifier, estimate
    from moco_scale.engines.memory import model_shapes, numel

    kwargs = {"arch": "vit_small", "img_size": 64}
    shapes = model_shapes(_classifier(kwargs, 1000))
    vit = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=1000, pretrained=False)
    assert numel(shapes.trainable) == sum(p.numel() for p in vit.parameters()) and not shapes.momentum
    profile = activation_profile(kwargs)
    setup = Setup(engine_config("ddp"), 1, 0, 0)
    ft = estimate(kwargs, shapes, profile, setup, 16, "fp32", finetune=True)
    pre = estimate(kwargs, model_shapes(build_moco(**kwargs, seed=0, device="meta")), profile, setup, 16, "fp32")
    assert ft["crops_per_rank"] == 16 == pre["crops_per_rank"] // 2 and ft["momentum"] == 0
    assert ft["activations"] == activation_bytes(dataclasses.replace(profile, heads=0), crops=16)
    res = run_cli(["plan", "--finetune", "-a", "vit_small", "-b", "64", "--nodes", "1", "--gpus-per-node", "2",
                   "--engine-config", engine_config("fsdp"), "--image-size", "64"])
    assert res.returncode == 0 and "plan --finetune" in res.stdout and "backbone chunk" in res.stdout, res.stderr


def test_plan_recommends_only_setups_pretrain_accepts():
    """plan runs pretrain's own setup check: no chunked ResNet, no LARS on a ZeRO partition, said as pretrain says
    (test_engines.py: pretrain's side)."""
    res = run_cli(["plan", "-a", "resnet50", "-b", "4096", "--engine-config", engine_config("ddp"), "--image-size",
                   "96", "--gpu-memory", "12"])
    assert res.returncode == 0, res.stderr
    fit = [line for line in res.stdout.splitlines() if line.startswith(("smallest setup", "nothing fits"))]
    assert fit and ("backbone chunk off" in fit[0] or fit[0].startswith("nothing fits")), res.stdout
    res = run_cli(["plan", "-a", "resnet50", "-b", "4096", "--engine-config", engine_config("zero2")])
    assert res.returncode == 2 and "would not launch: LARS needs the norm of whole parameters" in res.stderr
