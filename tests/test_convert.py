"""moco-scale convert: DeiT/timm/torchvision backbones that load into those libraries and compute the
same features as the backbone inside moco-scale; the reference layout round trip; wrong inputs."""

from __future__ import annotations

import pytest
import timm
import torch
import torchvision
from helpers import COMMON_TINY_RUN, TINY_VIT, run_cli

from moco_scale import build_moco
from moco_scale.models import backbone_features

HEADS = dict(moco_dim=32, moco_mlp_dim=64)  # small heads: the backbones are the real ones


def reference_file(path, arch: str, **kwargs) -> torch.nn.Module:
    """A checkpoint as the reference trainer writes it (no moco-scale record, no optimizer)."""
    torch.manual_seed(0)
    model = build_moco(arch, **kwargs)
    torch.save({"epoch": 300, "arch": arch, "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}},
               path)
    return model


def convert(*args: str):
    return run_cli(["convert", *args])


def test_deit_loads_into_timm_vit_small_with_12_heads(tmp_path):
    model = reference_file(tmp_path / "ref.pth.tar", "vit_small", **HEADS)
    res = convert("--to", "deit", str(tmp_path / "ref.pth.tar"), str(tmp_path / "deit.pth"))
    assert res.returncode == 0, res.stderr
    assert "num_heads=12" in res.stdout and "default to 6 heads" in res.stdout
    ckpt = torch.load(tmp_path / "deit.pth", weights_only=True)
    assert set(ckpt) == {"model"}
    assert not any(k.startswith(("head", "momentum", "predictor", "base_encoder")) for k in ckpt["model"])
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_heads=12)
    result = vit.load_state_dict(ckpt["model"], strict=False)
    assert sorted(result.missing_keys) == ["head.bias", "head.weight"] and not result.unexpected_keys
    vit.eval()
    model.eval()
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        want = backbone_features(model.base_encoder, x)
        got = vit.forward_head(vit.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the trap the message warns about: a 6-head model loads the same tensors and computes something else
    six = timm.create_model("vit_small_patch16_224", pretrained=False)
    six.load_state_dict(ckpt["model"], strict=False)
    with torch.no_grad():
        assert (six.eval().forward_head(six.forward_features(x), pre_logits=True) - want).abs().max() > 1e-2


def test_timm_and_torchvision_backbones(tmp_path):
    reference_file(tmp_path / "vit.pth.tar", "vit_tiny", img_size=32, patch_size=8, **HEADS)
    assert convert("--to", "timm", str(tmp_path / "vit.pth.tar"), str(tmp_path / "timm.pth")).returncode == 0
    sd = torch.load(tmp_path / "timm.pth", weights_only=True)
    assert "cls_token" in sd and "blocks.0.attn.qkv.weight" in sd and not any(k.startswith("head") for k in sd)

    model = reference_file(tmp_path / "r50.pth.tar", "resnet50", **HEADS)
    res = convert("--to", "torchvision", str(tmp_path / "r50.pth.tar"), str(tmp_path / "tv.pth"))
    assert res.returncode == 0, res.stderr
    net = torchvision.models.resnet50()
    result = net.load_state_dict(torch.load(tmp_path / "tv.pth", weights_only=True), strict=False)
    assert sorted(result.missing_keys) == ["fc.bias", "fc.weight"] and not result.unexpected_keys
    net.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), backbone_features(model.base_encoder.eval(), x))


def test_reference_round_trip_of_a_moco_scale_checkpoint(tmp_path):
    res = run_cli(["pretrain", *COMMON_TINY_RUN, "--output-dir", str(tmp_path / "run")])
    assert res.returncode == 0, res.stderr[-2000:]
    src = tmp_path / "run" / "checkpoint.pth.tar"
    assert convert("--to", "reference", str(src), str(tmp_path / "ref.pth.tar")).returncode == 0
    assert convert("--to", "reference", str(tmp_path / "ref.pth.tar"), str(tmp_path / "ref2.pth.tar")).returncode == 0
    a, b = torch.load(src, weights_only=True), torch.load(tmp_path / "ref2.pth.tar", weights_only=True)
    assert b["arch"] == "vit_tiny" and b["epoch"] == a["epoch"] and set(b["state_dict"]) == set(a["state_dict"])
    assert all(torch.equal(a["state_dict"][k], v) for k, v in b["state_dict"].items())
    prefixes = {k.split(".")[1] for k in b["state_dict"]}
    assert all(k.startswith("module.") for k in b["state_dict"])
    assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}


@pytest.mark.parametrize("to,message", [
    ("deit", "does not match vit_small (missing: base_encoder.blocks.10"),
    ("torchvision", "does not match vit_small"),
])
def test_a_checkpoint_from_another_model_is_refused(tmp_path, to, message):
    torch.manual_seed(0)
    tiny = build_moco(**{**TINY_VIT, **HEADS})  # two blocks of dim 64, labelled as a ViT-S below
    state = {f"module.{k}": v for k, v in tiny.state_dict().items()}
    torch.save({"epoch": 1, "arch": "vit_small", "state_dict": state}, tmp_path / "wrong.pth.tar")
    res = convert("--to", to, str(tmp_path / "wrong.pth.tar"), str(tmp_path / "out.pth"))
    assert res.returncode == 2 and message in res.stderr, res.stderr
    assert not (tmp_path / "out.pth").exists()


def test_wrong_target_for_the_architecture(tmp_path):
    reference_file(tmp_path / "vit.pth.tar", "vit_tiny", img_size=32, patch_size=8, **HEADS)
    res = convert("--to", "torchvision", str(tmp_path / "vit.pth.tar"), str(tmp_path / "out.pth"))
    assert res.returncode == 2 and "--to torchvision needs a ResNet checkpoint" in res.stderr


def test_convert_never_overwrites_its_input_or_an_existing_file(tmp_path, capsys):
    """In-process: `convert --to deit X X` replaced the checkpoint with a backbone (rc 0); a folder as output left
    a traceback and a *.tmp.* file. Each is refused with rc 2 and the file untouched; --force replaces an output."""
    from moco_scale.commands.convert import main

    src = tmp_path / "ckpt.pth.tar"
    reference_file(src, "vit_tiny", img_size=32, patch_size=8, **HEADS)
    before = src.read_bytes()
    cases = [([str(src), str(src)], "is the input"),
             ([str(src), str(tmp_path / "." / "ckpt.pth.tar")], "is the input"),
             ([str(src), str(tmp_path)], "is a folder")]
    for args, message in cases:
        assert main(["--to", "deit", *args]) == 2
        assert message in capsys.readouterr().err
    assert src.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pth.tar"]
    out = tmp_path / "deit.pth"
    assert main(["--to", "deit", str(src), str(out)]) == 0
    first = out.stat().st_mtime_ns
    assert main(["--to", "timm", str(src), str(out)]) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert out.stat().st_mtime_ns == first
    assert main(["--to", "timm", "--force", str(src), str(out)]) == 0
    assert "model" not in torch.load(out, weights_only=True)  # timm's layout replaced DeiT's
    assert main(["--to", "universal", str(src), str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
