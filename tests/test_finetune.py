"""Fine-tuning: every engine against a plain timm + torch AdamW oracle written out here (one and three steps,
world 1 and 2, MAE's layer decay), the recipes' values and schedules against their sources, strict backbone
loading, exact evaluation counts at any world size, an exact mid-epoch resume, and the datasets' errors."""

from __future__ import annotations

import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    BIN,
    TINY_VIT,
    assert_matches_oracle,
    engine_config,
    free_port,
    noise_only_elements,
    rel_err,
    run_cli,
    spawn,
)
from timm.models.vision_transformer import VisionTransformer

from moco_scale import build_moco
from moco_scale.checkpoint.reference import CheckpointError, backbone_of, pretrained_backbone
from moco_scale.dist import DistContext, mean_across_ranks
from moco_scale.engines import load_engine_config
from moco_scale.models.classifier import build_classifier
from moco_scale.optim import OptimizerSpec
from moco_scale.train import recipes
from moco_scale.train.finetune import strict_initial_state

B, STEPS, ITERS, CLASSES = 8, 3, 2, 5
SETTINGS = {k: TINY_VIT[k] for k in ("arch", "img_size", "patch_size", "embed_dim", "depth", "num_heads")}
#: the MAE recipe at this test's size: layer decay, per-iteration warmup and cosine (3 steps cross the warmup)
RECIPE = recipes.resolve_recipe("mae", "vit_tiny", {"batch_size": B, "epochs": 3, "warmup_epochs": 1, "lr": 4e-2})


# -- the oracle: a plain timm ViT, torch AdamW, MAE's groups, schedule and soft-target loss written out ------
def plain_groups(model: VisionTransformer, wd: float, decay: float) -> list[dict]:
    """MAE's util/lr_decay.py as timm's param_groups_layer_decay applies it, written out: layer 0 = tokens and patch
    embedding, i + 1 = block i, depth + 1 = the head; scale decay ** (depth + 1 - layer); no weight decay on 1-D
    tensors and the tokens. The final norm of a cls-token ViT is timm's one departure from MAE's rule (which puts
    everything else at depth + 1): timm's matcher orders it after the last block, in that block's layer."""
    depth = len(model.blocks)
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        layer = 0 if name.startswith(("cls_token", "pos_embed", "patch_embed")) else \
            int(name.split(".")[1]) + 1 if name.startswith("blocks.") else depth if name.startswith("norm.") else \
            depth + 1
        no_decay = p.ndim == 1 or name in ("cls_token", "pos_embed")
        g = groups.setdefault((layer, no_decay), {"params": [], "names": [], "lr_scale": decay ** (depth + 1 - layer),
                                                  "weight_decay": 0.0 if no_decay else wd})
        g["params"].append(p)
        g["names"].append(name)
    return list(groups.values())


def plain_lr(epoch: float, r: recipes.Recipe) -> float:
    peak = r.base_lr * r.batch_size / 256
    if epoch < r.warmup_epochs:
        return peak * epoch / r.warmup_epochs
    return r.min_lr + (peak - r.min_lr) * 0.5 * (1 + math.cos(math.pi * (epoch - r.warmup_epochs) /
                                                              (r.epochs - r.warmup_epochs)))


def soft_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (-target * F.log_softmax(logits, dim=-1)).sum(-1).mean()


def plain_vit() -> VisionTransformer:
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=CLASSES,
                             qkv_bias=True, class_token=True, global_pool="token",
                             norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))


def pretrained_state() -> dict[str, torch.Tensor]:
    moco = build_moco(**TINY_VIT, seed=7)
    return backbone_of({k: v.detach() for k, v in moco.state_dict().items()}, "vit_tiny")


def oracle_run(start: dict[str, torch.Tensor], batches, dtype=torch.float32):
    model = plain_vit().to(dtype)
    model.load_state_dict({k: v.to(dtype) for k, v in start.items()})
    groups = plain_groups(model, RECIPE.weight_decay, RECIPE.layer_decay)
    opt = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups], lr=0.0, eps=1e-8,
                            foreach=False)
    losses = []
    for t, (x, y) in enumerate(batches):
        lr = plain_lr(t / ITERS, RECIPE)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        loss = soft_ce(model(x.to(dtype)), y.to(dtype))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, {k: v.detach().clone() for k, v in model.state_dict().items()}, groups


def make_batches(dtype=torch.float32):
    """Mixed inputs made once (mixup and augmentation deterministic for the test: the same tensors to both)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(STEPS):
        target = torch.distributions.Dirichlet(torch.full((CLASSES,), 0.5)).sample((B,))  # soft, as Mixup's
        out.append((torch.randn(B, 3, 32, 32, generator=g).to(dtype), target.to(dtype)))
    return out


# -- the engines ----------------------------------------------------------------------------------------
def finetune_engine(ctx: DistContext, config: str, batches, out_path):
    """The command's model, groups and engine (train/finetune.py's build), stepped over this rank's slices."""
    from timm.loss import SoftTargetCrossEntropy

    torch.manual_seed(0)
    model = build_classifier(SETTINGS, CLASSES, 0.0, SoftTargetCrossEntropy(), seed=11)
    initial = strict_initial_state(model, pretrained_state(), "test")
    spec = model.group_spec(RECIPE.weight_decay, RECIPE.layer_decay)
    cfg = load_engine_config(engine_config(config), B, ctx.world_size)
    engine = cfg.build(model, OptimizerSpec("adamw", RECIPE.weight_decay, groups=lambda m: m.param_groups(spec)), ctx,
                       initial=initial)
    start = {k.removeprefix("net."): v.detach().clone() for k, v in engine.full_state_dict().items()}
    b = B // ctx.world_size
    losses, lrs = [], []
    for t, (x, y) in enumerate(batches):
        lr = recipes.learning_rate(t / ITERS, RECIPE)
        loss = engine.train_step((x[ctx.rank * b:(ctx.rank + 1) * b], y[ctx.rank * b:(ctx.rank + 1) * b]), lr)
        losses.append(mean_across_ranks(loss).item())
        lrs.append([(g["lr"], lr * g.get("lr_scale", 1.0)) for g in engine.optimizer.param_groups])
    state = {k.removeprefix("net."): v.detach().clone() for k, v in engine.full_state_dict().items()}
    engine.close()
    if ctx.is_main:
        torch.save({"losses": losses, "state": state, "start": start, "lrs": lrs,
                    "groups": [(g["names"], g["weight_decay"], g.get("lr_scale")) for g in spec]}, out_path)


CONFIGS = ("ddp", "fsdp", "zero2", "zero3")


def _run_all(ctx: DistContext, batches, out_dir: str) -> None:
    for config in CONFIGS:
        finetune_engine(ctx, config, batches, Path(out_dir) / f"{config}.pt")


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    """Each engine at world 1 and 2 (real gloo processes, one group per world size), 3 steps."""
    batches = make_batches()
    out = {}
    for world in (1, 2):
        folder = tmp_path_factory.mktemp(f"world{world}")
        spawn(_run_all, world, batches, str(folder))
        out.update({(c, world): torch.load(folder / f"{c}.pt") for c in CONFIGS})
    return batches, out


@pytest.mark.parametrize("world", [1, 2])
@pytest.mark.parametrize("config", CONFIGS)
def test_finetune_step_matches_the_plain_timm_oracle(engine_runs, config, world):
    batches, runs = engine_runs
    got = runs[(config, world)]
    start = got["start"]
    want_losses, want, groups = oracle_run(start, batches)
    _, want64, _ = oracle_run(start, batches, torch.float64)
    params = {n for n, _ in plain_vit().named_parameters()}
    noise = noise_only_elements(want, want64, start, params)
    assert max(rel_err(want[k], start[k]) for k in params) > 1e-3  # the oracle moved: a comparison with teeth
    # one step and three steps
    assert abs(got["losses"][0] - want_losses[0]) <= 1e-5 * abs(want_losses[0])
    assert all(abs(g - w) <= 1e-5 * abs(w) for g, w in zip(got["losses"], want_losses, strict=True))
    assert_matches_oracle(got["state"], want, start, params, noise, exact=want64)
    # every group's lr was lr x its scale at every step; one optimizer group per (non-empty) group of the spec
    for step in got["lrs"]:
        assert len(step) == len(got["groups"]) and all(math.isclose(lr, want, rel_tol=1e-12) for lr, want in step)
    assert all(names for names, _, _ in got["groups"])
    # the groups are the oracle's (layer, decay) partition with its scales and weight decays
    mine = sorted((sorted(n.removeprefix("net.") for n in names), wd, scale) for names, wd, scale in got["groups"])
    plain = sorted((sorted(g["names"]), g["weight_decay"], g["lr_scale"]) for g in groups)
    assert [(n, w) for n, w, _ in mine] == [(n, w) for n, w, _ in plain]
    assert all(math.isclose(a[2], b[2], rel_tol=1e-12) for a, b in zip(mine, plain, strict=True))


def test_group_spec_is_timms_param_groups_layer_decay():
    from timm.loss import SoftTargetCrossEntropy
    from timm.optim import param_groups_layer_decay

    model = build_classifier(SETTINGS, CLASSES, 0.1, SoftTargetCrossEntropy(), seed=1)
    spec = model.group_spec(0.05, 0.65)
    names = {id(p): n for n, p in model.net.named_parameters()}
    timm_groups = param_groups_layer_decay(model.net, 0.05, no_weight_decay_list=model.net.no_weight_decay(),
                                           layer_decay=0.65)
    assert [(sorted(n.removeprefix("net.") for n in g["names"]), g["weight_decay"], g["lr_scale"]) for g in spec] == \
        [(sorted(names[id(p)] for p in g["params"]), g["weight_decay"], g["lr_scale"]) for g in timm_groups]
    assert len(spec) == 2 * (2 + 2)  # stem, 2 blocks, the rest; with and without weight decay
    assert model.net.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)  # drop path rising to the recipe's
    assert all(p.requires_grad for p in model.parameters())  # the position embedding trains too


# -- recipes and schedules ------------------------------------------------------------------------------
PRINTED = {
    "deit": dict(lr=5e-4 * 1024 / 512, weight_decay=0.05, epochs=300, warmup_epochs=5, warmup_lr=1e-6, min_lr=1e-5,
                 smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, drop_path=0.1,
                 aa="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=3, layer_decay=None, batch_size=1024,
                 eval_crop_pct=0.875),
    "mae": dict(lr=5e-4 * 1024 / 256, weight_decay=0.05, epochs=100, warmup_epochs=5, warmup_lr=0.0, min_lr=1e-6,
                smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, drop_path=0.1,
                aa="rand-m9-mstd0.5-inc1", reprob=0.25, repeated_aug=1, layer_decay=0.65, batch_size=1024,
                eval_crop_pct=0.875),
}
TRANSFER = {"cifar10": (0.1, 0.8, 1.0, 0.1), "cifar100": (0.1, 0.5, 1.0, 0.1), "flowers": (0.3, 0.0, 0.0, 0.1),
            "pets": (0.1, 0.8, 0.0, 0.0)}
for _name, (_wd, _mixup, _cutmix, _dp) in TRANSFER.items():
    PRINTED[_name] = dict(lr=3e-4 * 1024 / 512, weight_decay=_wd, epochs=100, warmup_epochs=3, warmup_lr=1e-6,
                          min_lr=1e-5, smoothing=0.1, mixup=_mixup, cutmix=_cutmix, mixup_switch_prob=0.5,
                          drop_path=_dp, aa=None, reprob=0.0, repeated_aug=1, layer_decay=None, batch_size=1024,
                          eval_crop_pct=0.875)


@pytest.mark.parametrize("name", list(PRINTED))
def test_print_recipe_prints_the_published_values(name):
    import contextlib
    import io

    from moco_scale.commands.finetune import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["--print-recipe", "--recipe", name, "-a", "vit_base"]) == 0
    printed = json.loads(out.getvalue())
    assert printed["recipe"] == name
    for key, value in PRINTED[name].items():
        assert printed[key] == pytest.approx(value) if isinstance(value, float) else printed[key] == value, key


def test_print_recipe_scales_and_overrides():
    res = run_cli(["finetune", "--print-recipe", "--recipe", "mae", "-a", "vit_huge", "-b", "512", "--mixup", "0",
                   "--drop-path", "0.25"])
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    # MAE's ViT-H values, the lr scaled by the given batch, the flags over the recipe
    assert printed["lr"] == pytest.approx(1e-3 * 512 / 256) and printed["layer_decay"] == 0.75
    assert printed["epochs"] == 50 and printed["mixup"] == 0 and printed["drop_path"] == 0.25
    assert printed["batch_size"] == 512


def test_deit_schedule_is_timms_cosine_stepped_as_deits_main():
    """DeiT's main.py calls lr_scheduler.step(epoch) after each epoch: epoch e trains at the value for e - 1."""
    from timm.scheduler import CosineLRScheduler

    r = recipes.resolve_recipe("deit", "vit_small", {"epochs": 12, "warmup_epochs": 3, "batch_size": 256})
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=r.lr)
    sched = CosineLRScheduler(opt, t_initial=r.epochs, lr_min=r.min_lr, warmup_t=r.warmup_epochs,
                              warmup_lr_init=r.warmup_lr)
    for epoch in range(r.epochs):
        trained_at = opt.param_groups[0]["lr"]
        for frac in (0.0, 0.5):  # stepped per epoch: constant inside one
            assert recipes.learning_rate(epoch + frac, r) == pytest.approx(trained_at, rel=1e-12)
        sched.step(epoch)


def test_repeated_augmentation_deals_copies_to_different_ranks():
    from moco_scale.data import GlobalBatchSampler

    world, batch = 3, 12
    per_rank = [list(GlobalBatchSampler(30, batch, world, r, seed=0, repeats=3)) for r in range(world)]
    first = [keys for rank in per_rank for keys in rank[:1]]
    keys = [k for rank_batch in first for k in rank_batch]
    assert len(keys) == batch and all(len(k) == 3 for k in keys)
    images = {}
    for rank, rank_batch in enumerate(first):
        for _, index, copy in rank_batch:
            images.setdefault(index, []).append((rank, copy))
    assert len(images) == batch // 3  # a third distinct
    assert all(sorted(c for _, c in v) == [0, 1, 2] and len({r for r, _ in v}) == 3 for v in images.values())


# -- loading -------------------------------------------------------------------------------------------
def test_strict_loading_refuses_other_heads_and_missing_tensors(pretrained, tmp_path):
    ref = str(pretrained / "checkpoint.pth.tar")
    state, settings = pretrained_backbone(ref)
    assert settings["num_heads"] == 4 and "moco_dim" not in settings
    with pytest.raises(CheckpointError, match="trained with 4 heads"):
        pretrained_backbone(ref, num_heads=2)
    model = build_classifier(settings, 3, 0.0, torch.nn.CrossEntropyLoss(), seed=0)
    del state["blocks.1.mlp.fc2.bias"]
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.mlp\.fc2\.bias"):
        strict_initial_state(model, state, ref)
    # a DeiT export (convert --to deit) is read with MoCo v3's heads for its architecture, width and depth read
    res = run_cli(["convert", "--to", "deit", ref, str(tmp_path / "deit.pth")])
    assert res.returncode == 0, res.stderr
    exported, export_settings = pretrained_backbone(str(tmp_path / "deit.pth"), arch="vit_tiny", num_heads=4)
    assert export_settings == {**settings, "num_heads": 4, "stop_grad_conv1": export_settings.get("stop_grad_conv1")} \
        or {k: export_settings[k] for k in ("embed_dim", "depth", "patch_size", "img_size", "num_heads")} == \
        {k: settings[k] for k in ("embed_dim", "depth", "patch_size", "img_size", "num_heads")}
    full, _ = pretrained_backbone(ref)
    assert set(exported) == set(full) and all(torch.equal(exported[k], full[k]) for k in full)


def _val_folder(root: Path, train: int, val: int) -> Path:
    from PIL import Image

    for split, n in (("train", train), ("val", val)):
        for c, colour in (("cat", (200, 40, 40)), ("dog", (40, 40, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n if c == "cat" else n - 1):  # odd val count
                Image.new("RGB", (40, 40), tuple((v + 9 * i) % 256 for v in colour)).save(root / split / c / f"{i}.png")
    return root


FT = ["-j", "0", "--device", "cpu", "-p", "2", "--epochs", "2", "--warmup-epochs", "1", "--lr", "1e-3"]


def test_resume_mid_epoch_is_exact(pretrained, tmp_path):
    """Mixup, RandAugment, random erasing and drop path (the deit recipe) drawn from keys: a run stopped after 3 steps
    and resumed ends bit for bit where the uninterrupted one does, its logged losses equal."""
    ref = str(pretrained / "checkpoint.pth.tar")
    common = ["finetune", "--pretrained", ref, "-b", "64", *FT, "--max-steps", "6"]
    res = run_cli([*common, "--output-dir", str(tmp_path / "whole")])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([*common[:-1], "3", "--output-dir", str(tmp_path / "part")])
    assert res.returncode == 0, res.stderr[-3000:]
    res = run_cli([*common, "--output-dir", str(tmp_path / "part"), "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resumed from" in res.stderr + res.stdout
    rows = lambda d: [json.loads(x) for x in open(d / "metrics.jsonl") if '"loss"' in x]  # noqa: E731
    whole = {r["step"]: r["loss"] for r in rows(tmp_path / "whole")}
    part = {r["step"]: r["loss"] for r in rows(tmp_path / "part")}
    assert sorted(whole) == [2, 4, 6] and sorted(part) == [2, 3, 4, 6]  # the stopped run logged its last step
    assert all(part[step] == loss for step, loss in whole.items())
    a = torch.load(tmp_path / "whole" / "finetuned.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "finetuned.pth", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["head.weight"], torch.zeros_like(a["head.weight"]))
    config = json.loads((tmp_path / "whole" / "config.json").read_text())
    assert config["resolved"]["recipe"]["recipe"] == "deit" and config["resolved"]["recipe"]["mixup"] == 0.8


def test_evaluation_counts_every_image_once_at_any_world_size(pretrained, tmp_path):
    """An ImageFolder with 9 val images: world 1 and world 2 (torchrun) count the same 9, and the count is what the
    exported classifier scores in a plain timm model here."""
    data = _val_folder(tmp_path / "data", train=8, val=5)
    ref = str(pretrained / "checkpoint.pth.tar")
    run = tmp_path / "ft"
    res = run_cli(["finetune", str(data), "--pretrained", ref, "-b", "8", *FT, "--output-dir", str(run)])
    assert res.returncode == 0, res.stderr[-3000:]
    trained = json.loads((run / "finetune.json").read_text())
    assert trained["images"] == 9 and [h["epoch"] for h in trained["history"]] == [1, 2]
    results = {}
    for world in (1, 2):
        launcher = [str(BIN / "moco-scale")] if world == 1 else [
            str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "moco_scale"]
        out = tmp_path / f"eval{world}"
        res = run_cli(["finetune", str(data), "--pretrained", ref, "-b", "8", *FT, "--evaluate", "--resume",
                       str(run / "checkpoints"), "--output-dir", str(out)], launcher=launcher)
        assert res.returncode == 0, res.stderr[-3000:]
        results[world] = json.loads((out / "finetune.json").read_text())
    assert results[1]["images"] == results[2]["images"] == 9
    assert results[1]["correct"] == results[2]["correct"] == trained["correct"]
    # independent: the exported model in plain timm on the evaluation transform (Resize 36 + CenterCrop 32)
    import torchvision.transforms as T
    from PIL import Image

    export = torch.load(run / "finetuned.pth", weights_only=True)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, num_classes=2,
                            qkv_bias=True, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6))
    vit.load_state_dict(export["model"])
    tf = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32), T.ToTensor(),
                    T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
    files = [(p, i) for i, c in enumerate(("cat", "dog")) for p in sorted((data / "val" / c).iterdir())]
    x = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in files])
    with torch.no_grad():
        correct = int((vit.eval()(x).argmax(1) == torch.tensor([i for _, i in files])).sum())
    assert correct == trained["correct"]


def test_missing_torchvision_dataset_is_one_line(pretrained, tmp_path):
    res = run_cli(["finetune", str(tmp_path), "--dataset", "cifar10", "--pretrained",
                   str(pretrained / "checkpoint.pth.tar"), *FT, "--output-dir", str(tmp_path / "out")])
    assert res.returncode == 2
    assert "cifar-10-batches-py" in res.stderr and "download=True" in res.stderr and "Traceback" not in res.stderr


def test_pets_from_a_local_root(pretrained, tmp_path):
    """torchvision's OxfordIIITPet layout (trainval to train, test to evaluate), read without downloading."""
    from PIL import Image

    base = tmp_path / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations").mkdir()
    for split, n in (("trainval", 8), ("test", 3)):
        lines = []
        for i in range(n):
            name = f"{'Abyssinian' if i % 2 else 'beagle'}_{split}{i}"
            Image.new("RGB", (40, 40), (i * 20, 90, 30)).save(base / "images" / f"{name}.jpg")
            lines.append(f"{name} {1 + i % 2} {1 + i % 2} 1")
        (base / "annotations" / f"{split}.txt").write_text("\n".join(lines) + "\n")
    res = run_cli(["finetune", str(tmp_path), "--dataset", "pets", "--recipe", "pets", "--pretrained",
                   str(pretrained / "checkpoint.pth.tar"), "-b", "8", *FT, "--epochs", "1", "--warmup-epochs", "0",
                   "--output-dir", str(tmp_path / "out")])
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "finetune.json").read_text())
    assert out["images"] == 3 and out["recipe"]["recipe"] == "pets"
