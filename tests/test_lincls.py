"""Linear evaluation: the reported accuracy is what the saved classifier scores on the frozen backbone
(recomputed here), the same under the deepspeed launcher at world 2, resumable, and other architectures refused."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BIN, COMMON_TINY_RUN, deepspeed_launcher, engine_config, run_cli

from moco_scale.checkpoint.reference import pretrained_encoder
from moco_scale.data import eval_transform, load_digits_split
from moco_scale.models import backbone_features

LINCLS = ["--epochs", "2", "-b", "128", "-j", "0", "--bn", "--device", "cpu"]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre") / "run"
    res = run_cli(["pretrain", *COMMON_TINY_RUN, "--output-dir", str(out)])
    assert res.returncode == 0, res.stderr[-2000:]
    return out


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
