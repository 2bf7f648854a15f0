"""Distributed streaming kNN (moco_scale/eval/knn.py, `moco-scale knn`, `pretrain --knn-every`): the same counts as
a plain one-matrix weighted kNN written here, at world 1, 2 and 3; memory that follows the batch, not the dataset;
a curve during pretraining that leaves the trajectory untouched under DDP, FSDP and ZeRO-3 and whose last point is
the command's result on the checkpoint the run saved."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import BIN, TINY_VIT_FLAGS, engine_config, free_port, peak_cpu_bytes, run_cli, spawn

from moco_scale.checkpoint.reference import pretrained_encoder
from moco_scale.data import eval_transform, load_digits_split
from moco_scale.data.labelled import Shard
from moco_scale.dist import DistContext
from moco_scale.eval.knn import Features, gather_split, knn_accuracy, shard_sizes
from moco_scale.models import backbone_features

CLASSES, T = 7, 0.07


def plain_knn(train_f, train_y, val_f, val_y, k: int, classes: int) -> tuple[int, int]:
    """DINO's weighted kNN over the whole val x train similarity matrix: (top-1, top-5) correct counts."""
    train_f, val_f = F.normalize(train_f.float(), dim=1), F.normalize(val_f.float(), dim=1)
    sim, idx = (val_f @ train_f.T).topk(min(k, len(train_f)), dim=1)
    weights, labels = (sim / T).exp(), train_y[idx]
    scores = torch.zeros(len(val_f), classes)
    rows = torch.arange(len(val_f))
    for j in range(labels.shape[1]):  # neighbour by neighbour, nearest first
        scores[rows, labels[:, j]] += weights[:, j]
    top = scores.topk(5, dim=1).indices
    return int((top[:, 0] == val_y).sum()), int((top == val_y[:, None]).any(1).sum())


def clustered(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(CLASSES, 16, generator=torch.Generator().manual_seed(0))
    labels = torch.randint(0, CLASSES, (n,), generator=g)
    return centers[labels] + 2.5 * torch.randn(n, 16, generator=g), labels


def _distributed_knn(ctx, out: str) -> None:
    (tf, ty), (vf, vy) = clustered(301, 1), clustered(97, 2)
    mine = lambda f, y: Features(F.normalize(f, dim=1)[list(Shard(len(f), ctx.world_size, ctx.rank))],  # noqa: E731
                                 y[list(Shard(len(f), ctx.world_size, ctx.rank))])
    val = gather_split(mine(vf, vy), shard_sizes(len(vf), ctx.world_size), ctx)
    result = knn_accuracy(mine(tf, ty), val, CLASSES, ctx, chunk=40)  # chunks smaller than a rank's share
    if ctx.is_main:
        Path(out).write_text(json.dumps(result))


@pytest.mark.parametrize("world", [1, 2, 3])
def test_distributed_knn_counts_equal_the_plain_knn(tmp_path, world):
    """301 training features over `world` ranks (at world 3 a rank holds ~100, fewer than k=200), 97 val gathered
    from shards, both walked in chunks of 40: every count is the plain kNN's."""
    out = tmp_path / "knn.json"
    if world == 1:
        _distributed_knn(DistContext(0, 1, 0, 1, torch.device("cpu")), str(out))
    else:
        spawn(_distributed_knn, world, str(out))
    got = json.loads(out.read_text())
    (tf, ty), (vf, vy) = clustered(301, 1), clustered(97, 2)
    for key, k in (("knn", 20), ("knn200", 200)):
        top1, top5 = plain_knn(tf, ty, vf, vy, k, CLASSES)
        assert (got[f"{key}_top1"], got[f"{key}_top5"]) == (100 * top1 / 97, 100 * top5 / 97), key
    assert got["knn_images"] == 97 and 0 < got["knn_top1"] < 100  # neither trivial nor hopeless


def test_memory_follows_the_batch_not_the_dataset(tmp_path):
    """600 images at 224 px (361 MB as the float tensors the old probe listed): the torch allocations of a whole
    evaluation in batches of 32 peak below four batches' worth, a quarter of that."""
    from PIL import Image

    from moco_scale.data.labelled import image_splits, shard_loader
    from moco_scale.eval.knn import evaluate_knn
    from moco_scale.models import build_moco

    for split, n in (("train", 160), ("val", 40)):
        for c in range(3):
            (tmp_path / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (240, 240), (80 * c, 3 * i % 256, 40)).save(tmp_path / split / f"c{c}" / f"{i}.jpg")
    splits = image_splits(str(tmp_path), 224)
    in_memory = (len(splits.train) + len(splits.val)) * 3 * 224 * 224 * 4
    encoder = build_moco("vit_tiny", img_size=224, patch_size=32, embed_dim=64, depth=2, num_heads=4, moco_dim=32,
                         moco_mlp_dim=64, seed=0).base_encoder.eval()
    ctx = DistContext(0, 1, 0, 1, torch.device("cpu"))
    transform = eval_transform(224, resize=256)
    loaders = [shard_loader(s, transform, 32, 1, 0) for s in (splits.train, splits.val)]
    with torch.no_grad():
        result, peak = peak_cpu_bytes(lambda: evaluate_knn(lambda x: backbone_features(encoder, x), *loaders, 3, ctx))
    assert result["knn_images"] == 120
    batch = 32 * 3 * 224 * 224 * 4  # one batch of float images: the loader's samples, their stack, the forward
    assert peak < 4 * batch < in_memory / 4, (peak, batch, in_memory)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("knn") / "run"
    res = run_cli(["pretrain", *TINY_VIT_FLAGS, "-b", "64", "--max-steps", "3", "-j", "0", "--device", "cpu",
                   "--optimizer", "adamw", "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


def test_the_command_at_world_1_and_3_equals_the_plain_knn(pretrained, tmp_path):
    """`moco-scale knn` in one process and under torchrun at world 3 (the digits' 360 val images do not split
    evenly into 3 batches of 256) give the plain kNN's counts on features computed here without the package's kNN."""
    from moco_scale.commands.knn import main

    args = ["--pretrained", str(pretrained), "-j", "0", "--device", "cpu", "--output"]
    assert main([*args, str(tmp_path / "1.json")]) == 0
    launcher = [str(BIN / "torchrun"), "--nproc_per_node", "3", "--master_port", str(free_port()), "-m", "moco_scale",
                "knn"]
    res = run_cli([*args, str(tmp_path / "3.json")], launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    one, three = (json.loads((tmp_path / f"{w}.json").read_text()) for w in (1, 3))
    assert three["world_size"] == 3
    encoder, _, state, settings = pretrained_encoder(str(pretrained))
    encoder.load_state_dict(state, assign=True)
    encoder.eval()
    tf = eval_transform(settings["img_size"])
    feats = {}
    for split in ("train", "val"):
        images = load_digits_split(split, settings["img_size"])
        with torch.no_grad():
            feats[split] = (backbone_features(encoder, torch.stack([tf(im) for im, _ in images])),
                            torch.tensor([y for _, y in images]))
    for key, k in (("knn", 20), ("knn200", 200)):
        top1, top5 = plain_knn(*feats["train"], *feats["val"], k, 10)
        want = (100 * top1 / 360, 100 * top5 / 360)
        assert (one[f"{key}_top1"], one[f"{key}_top5"]) == want == (three[f"{key}_top1"], three[f"{key}_top5"]), key


CURVE = [*TINY_VIT_FLAGS, "-b", "128", "--epochs", "2", "--max-steps", "13", "-p", "1", "-j", "0", "--device", "cpu",
         "--optimizer", "adamw", "--warmup-epochs", "0"]


def _losses_and_evals(run: Path) -> tuple[list[float], list[dict]]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "loss" in r], [r for r in rows if "knn_top1" in r]


# DDP: -m slow (its call() is a plain forward in eval mode; the sharded engines are where a call can leave state)
@pytest.mark.parametrize("engine", [pytest.param("ddp", marks=pytest.mark.slow), "fsdp", "zero3"])
def test_the_knn_curve_leaves_the_trajectory_unchanged(tmp_path, engine):
    """13 steps (11 per epoch) with --knn-every 1: evaluations at step 11 and 13, both encoders, evaluated in
    place (FSDP and ZeRO-3 at world 2: sharded); the losses of every step equal the run's without it, bit for
    bit; the last point equals `moco-scale knn` on the checkpoint the run wrote."""
    if engine == "ddp":
        launcher = None
        args = CURVE
    else:
        launcher = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                    "moco_scale", "pretrain"]
        args = [*CURVE, "--engine-config", engine_config(engine)]
    for name, extra in (("plain", []), ("curve", ["--knn-every", "1"])):
        res = run_cli([*([] if launcher else ["pretrain"]), *args, *extra, "--output-dir", str(tmp_path / name)],
                      launcher=launcher)
        assert res.returncode == 0, res.stderr[-3000:]
    plain, no_evals = _losses_and_evals(tmp_path / "plain")
    curve, evals = _losses_and_evals(tmp_path / "curve")
    assert len(plain) == 13 and curve == plain and not no_evals
    assert [e["step"] for e in evals] == [11, 13]
    assert all(0 <= e[k] <= 100 for e in evals for k in ("knn_top1", "momentum_knn_top1", "knn200_top1"))
    summary = json.loads((tmp_path / "curve" / "summary.json").read_text())
    assert [h["step"] for h in summary["history"]] == [11, 13]
    from moco_scale.commands.knn import main

    assert main([str(tmp_path / "curve" / "checkpoint.pth.tar"), "--pretrained",
                 str(tmp_path / "curve" / "checkpoint.pth.tar"), "-b", "64", "-j", "0", "--device", "cpu",
                 "--output", str(tmp_path / "knn.json")]) == 2  # DATA is a folder, not a file: refused
    assert main(["--pretrained", str(tmp_path / "curve" / "checkpoint.pth.tar"), "-b", "64", "-j", "0", "--device",
                 "cpu", "--output", str(tmp_path / "knn.json")]) == 0
    command = json.loads((tmp_path / "knn.json").read_text())
    assert (command["knn_top1"], command["knn200_top1"]) == (evals[-1]["knn_top1"], evals[-1]["knn200_top1"])
