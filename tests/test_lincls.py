"""Linear evaluation: the reported accuracy is what the saved classifier scores on the frozen backbone
(recomputed here), the same under the deepspeed launcher at world 2, resumable, and other architectures refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BIN, COMMON_TINY_RUN, deepspeed_launcher, engine_config, run_cli, torchrun

from moco_scale.checkpoint.reference import pretrained_encoder
from moco_scale.data import eval_transform, load_digits_split
from moco_scale.models import backbone_features

LINCLS = ["--epochs", "2", "-b", "128", "-j", "0", "--bn", "--device", "cpu"]


def top1_of_saved_classifier(ckpt: str, run_dir) -> float:
    encoder, _, state, settings = pretrained_encoder(ckpt)
    encoder.load_state_dict(state, assign=True)
    saved = torch.load(run_dir / "lincls_checkpoint.pth.tar", weights_only=True)["classifier"]
    val = load_digits_split("val", settings["img_size"])
    tf = eval_transform(settings["img_size"])
    x = torch.stack([tf(img) for img, _ in val])
    y = torch.tensor([label for _, label in val])
    with torch.no_grad():
        f = backbone_features(encoder.eval(), x)
        f = (f - saved["0.running_mean"]) / torch.sqrt(saved["0.running_var"] + 1e-5)
        logits = f @ saved["1.weight"].t() + saved["1.bias"]
    return (logits.argmax(1) == y).double().mean().item() * 100


@pytest.mark.parametrize("world", [1, 2])
def test_lincls_reports_what_its_classifier_scores(pretrained, world, tmp_path):
    ckpt = str(pretrained / "checkpoints" / "step_00000001")  # a resumable folder, consolidated on the fly
    # world 2 under the deepspeed launcher, as the README's cluster lines run it (torchrun runs it the same way)
    launcher = [str(BIN / "moco-scale"), "lincls"] if world == 1 else [*deepspeed_launcher(2)[:-1], "lincls"]
    res = run_cli([ckpt if a == "CKPT" else a for a in ["--pretrained", "CKPT", *LINCLS, "--output-dir",
                                                        str(tmp_path)]], launcher=launcher)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((tmp_path / "lincls.json").read_text())
    assert [h["epoch"] for h in summary["history"]] == [1, 2] and 0 <= summary["top5"] <= 100
    assert summary["top1"] == pytest.approx(top1_of_saved_classifier(ckpt, tmp_path), abs=1e-9)
    assert summary["top1"] > 10  # above chance on 10 balanced classes after 2 epochs


def test_lincls_resumes_and_refuses_another_architecture(pretrained, tmp_path):
    ref = str(pretrained / "checkpoint.pth.tar")
    res = run_cli(["lincls", "--pretrained", ref, *LINCLS, "--epochs", "1", "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(["lincls", "--pretrained", ref, *LINCLS, "--output-dir", str(tmp_path), "--resume", "auto"])
    assert res.returncode == 0, res.stderr[-2000:]
    history = json.loads((tmp_path / "lincls.json").read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2]  # epoch 1 was not run again

    res = run_cli(["lincls", "--pretrained", ref, "-a", "resnet50", *LINCLS, "--output-dir", str(tmp_path / "x")])
    assert res.returncode == 2 and "holds vit_tiny, not -a resnet50" in res.stderr
    ckpt = torch.load(ref, weights_only=True)
    ckpt["state_dict"]["module.base_encoder.blocks.1.mlp.fc1.weight"] = torch.zeros(3, 3)
    del ckpt["state_dict"]["module.base_encoder.blocks.0.norm1.bias"]
    torch.save(ckpt, tmp_path / "other.pth.tar")
    res = run_cli(["lincls", "--pretrained", str(tmp_path / "other.pth.tar"), *LINCLS, "--output-dir",
                   str(tmp_path / "y")])
    assert res.returncode == 2 and "does not match vit_tiny" in res.stderr
    assert "blocks.0.norm1.bias" in res.stderr and "blocks.1.mlp.fc1.weight" in res.stderr


def test_lincls_reads_a_sharded_checkpoint(tmp_path):
    out = tmp_path / "fsdp"
    res = run_cli(["pretrain", *COMMON_TINY_RUN, "--engine-config", engine_config("fsdp"), "--output-dir",
                   str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli(["lincls", "--pretrained", str(out), *LINCLS, "--epochs", "1", "--output-dir", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "lincls: top-1" in res.stdout


def folder(root, split: str, classes: dict[str, int]) -> None:
    """root/split/<class>/<i>.png, images that differ by class (colour) and by index (brightness)."""
    from PIL import Image

    for k, (name, count) in enumerate(classes.items()):
        (root / split / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (40, 40), (40 + 70 * k, 10 * i % 250, 200 - 60 * k)).save(root / split / name / f"{i}.png")


def test_val_classes_are_matched_by_name_and_a_missing_one_is_named(tmp_path):
    from moco_scale.data import DataError
    from moco_scale.data.labelled import image_splits

    folder(tmp_path / "d", "train", {"a": 2, "b": 2, "c": 2})
    folder(tmp_path / "d", "val", {"a": 1, "c": 1})
    splits = image_splits(str(tmp_path / "d"), 32)
    assert splits.classes == ["a", "b", "c"] and [label for _, label in splits.val] == [0, 2]  # c is 2, not 1
    folder(tmp_path / "e", "train", {"a": 2, "b": 2})
    folder(tmp_path / "e", "val", {"a": 1, "d": 1})
    with pytest.raises(DataError, match=r"e/val/d has no counterpart in train/"):
        image_splits(str(tmp_path / "e"), 32)


def test_every_val_image_counts_once_at_any_world_size_and_results_are_kept(pretrained, tmp_path, capsys):
    """An odd validation set: the saved classifier scored at world 1 (in-process) and world 2 (torchrun, -e) gives
    the same correct count over every image once (DistributedSampler's padding counted duplicates). A second
    evaluation of another checkpoint into the folder is refused, --resume of it too; --overwrite moves it aside."""
    from moco_scale.commands.lincls import main

    data = tmp_path / "data"
    folder(data, "train", {"a": 12, "b": 12})
    folder(data, "val", {"a": 4, "b": 3})  # 7 images
    out, ckpt = tmp_path / "out", str(pretrained / "checkpoint.pth.tar")
    args = [str(data), "--pretrained", ckpt, "--epochs", "1", "-b", "8", "-j", "0", "--device", "cpu",
            "--output-dir", str(out)]
    assert main(args) == 0
    first = json.loads((out / "lincls.json").read_text())
    assert first["images"] == 7 and 0 <= first["correct"] <= 7
    res = run_cli([*args, "--evaluate", "--resume", "auto"], launcher=[*torchrun(2)[:-1], "lincls"])
    assert res.returncode == 0, res.stderr[-3000:]
    again = json.loads((out / "lincls.json").read_text())
    assert (again["images"], again["correct"], again["top1"]) == (7, first["correct"], first["top1"])

    other = str(pretrained / "checkpoints" / "step_00000001")  # another identity: a folder, not the file
    capsys.readouterr()
    assert main([*args[:2], other, *args[3:]]) == 2 and "already holds a run" in capsys.readouterr().err
    assert main([*args[:2], other, *args[3:], "--resume", "auto"]) == 2
    assert "ran linear evaluation on another pretrained checkpoint" in capsys.readouterr().err
    assert main([*args[:2], other, *args[3:], "--overwrite"]) == 0
    assert not list(tmp_path.glob("out.overwritten-*"))  # moved aside, deleted once the new run had saved
    assert json.loads((out / "lincls.json").read_text())["pretrained"] == other
