"""User mistakes, one table: every command answers with exit 2 and one `moco-scale CMD: error: ...` line naming
the flag, file or value at fault, before any process group exists, and nothing given to it is changed. In-process
(a launcher adds nothing to how an argument is checked); the launcher-level cases live in test_cli/test_launch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import COMMON_TINY_RUN, TINY_VIT
from PIL import Image

from moco_scale import build_moco
from moco_scale.cli import main

JUNK, JSON, CKPT, DATA, FAIRSCALE, TYPO = "@junk", "@json", "@ckpt", "@data", "@fairscale", "@typo"  # see `files`
COMPILE, DS_COMPILE = "@compile", "@ds_compile"
UTF16, BOM, RUN = "@utf16", "@bom", "@run"
JUNK_SUB, SMALL, RO, RO_FILE = "@junk/x", "@small", "@ro", "@ro/out.pth"  # under a file; 3+3 train images; read-only
#: DeepSpeed JSONs with a value of the wrong type or kind (files: the `files` fixture writes them)
DS_WRONG = {
    "@bf16_bool": ({"bf16": True}, "key 'bf16' must be an object {\"enabled\": true}, not true"),
    "@enabled_string": ({"bf16": {"enabled": "true"}}, "key 'bf16.enabled' must be true, false or \"auto\", not "
                        "\"true\" (a string: DeepSpeed would train in fp32)"),
    "@offload_no_force": ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
                          "add \"zero_force_ds_cpu_optimizer\": false"),
    "@nvme_no_path": ({"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}},
                       "zero_force_ds_cpu_optimizer": False}, "'zero_optimization.offload_param.nvme_path' must name"),
    "@nvme_file": ({"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "nvme", "nvme_path": "@FILE"}},
                    "zero_force_ds_cpu_optimizer": False}, "is a file, not a folder"),
    "@param_offload_stage2": ({"zero_optimization": {"stage": 2, "offload_param": {"device": "cpu"}},
                               "zero_force_ds_cpu_optimizer": False}, "needs stage 3"),
    "@tensorboard_file": ({"tensorboard": {"enabled": True, "output_path": "@FILE"}},
                          "key 'tensorboard.output_path' "),
}

CASES: list[tuple[list[str], str]] = [
    # numeric flags: the range each takes, checked by argparse (moco_scale/flags.py)
    (["pretrain", "--lr=-1e-3"], "argument --lr/--learning-rate: -1e-3 is out of range: expected a number > 0"),
    (["pretrain", "--moco-m", "1.5"], "argument --moco-m: 1.5 is out of range: expected a number in [0, 1]"),
    (["pretrain", "--moco-t", "0"], "argument --moco-t: 0 is out of range"),
    (["pretrain", "--crop-min", "0"], "argument --crop-min: 0 is out of range: expected a number in (0, 1]"),
    (["pretrain", "--epochs", "0"], "argument --epochs: 0 is out of range: expected an integer >= 1"),
    (["pretrain", "-b", "-4"], "argument -b/--batch-size: -4 is out of range"),
    (["pretrain", "--wd", "nan"], "argument --wd/--weight-decay: nan is out of range: expected a number >= 0"),
    (["pretrain", "--keep-last", "0"], "argument --keep-last: 0 is out of range"),
    (["pretrain", "--save-every", "-1"], "argument --save-every: -1 is out of range"),
    (["pretrain", "--backbone-chunk", "-1"], "argument --backbone-chunk: -1 is out of range"),
    (["pretrain", "--dist-timeout", "0"], "argument --dist-timeout: 0 is out of range"),
    (["pretrain", "-j", "two"], "argument -j/--workers: 'two' is not an integer"),
    (["plan", "--gpus-per-node", "-8"], "argument --gpus-per-node: -8 is out of range: expected an integer >= 1"),
    (["plan", "--nodes", "0"], "argument --nodes: 0 is out of range"),
    (["plan", "--headroom", "1"], "argument --headroom: 1 is out of range: expected a number in [0, 1)"),
    (["plan", "--gpu-memory", "0"], "argument --gpu-memory: 0 is out of range"),
    (["lincls", "--momentum", "2"], "argument --momentum: 2 is out of range"),
    (["lincls", "--lr=-3"], "argument --lr: -3 is out of range"),
    (["lincls", "-b", "x"], "argument -b/--batch-size: 'x' is not an integer"),
    (["probe", "--pretrained", CKPT, "--seed", "-1"], "argument --seed: -1 is out of range"),
    # files that are not checkpoints: what they are not, and no advice to unpickle them
    (["convert", "--to", "deit", JUNK, "out.pth"], "is not a checkpoint: not a torch.save file"),
    (["convert", "--to", "deit", JSON, "out.pth"], "is not a checkpoint: not a torch.save file (it starts with b'{"),
    (["probe", "--pretrained", JUNK], "is not a checkpoint: not a torch.save file"),
    (["probe", "--pretrained", "missing.pth.tar"], "checkpoint missing.pth.tar does not exist"),
    (["lincls", "--pretrained", JSON], "is not a checkpoint: not a torch.save file"),
    (["pretrain", "--resume", JUNK, "-b", "16", "-j", "0", "--device", "cpu"], "is not a checkpoint"),
    # engine configs
    (["pretrain", "--engine-config", FAIRSCALE, "-b", "16"], "fairscale is not supported: its FSDP moved into "
     "PyTorch as torch.distributed.fsdp"),
    (["pretrain", "--engine-config", TYPO, "-b", "16"], "unknown top-level key(s) 'zero_optimizaton' (did you mean "
     "'zero_optimization'?)"),
    (["plan", "--engine-config", TYPO], "unknown top-level key(s) 'zero_optimizaton'"),
    (["pretrain", "--engine-config", DS_COMPILE, "-b", "16"], "compile is not offered under DeepSpeed"),
    (["pretrain", "--engine-config", COMPILE, "-a", "resnet_tiny", "-b", "16", "-j", "0", "--device", "cpu",
      "--max-steps", "1"], "key 'compile' is for ViT backbones"),
    *[(["pretrain", "--engine-config", name, "-b", "16"], message) for name, (_, message) in DS_WRONG.items()],
    (["plan", "--engine-config", "@enabled_string"], "key 'bf16.enabled' must be true, false or \"auto\""),
    # files of the wrong encoding or kind
    (["hostfile", UTF16], "is UTF-16 (as some Windows editors save it)"),
    (["hostfile", BOM], "starts with a UTF-8 byte-order mark"),
    (["hostfile", DATA], "Is a directory"),
    (["report", RUN, "--out", JUNK], "is a file: name a folder"),
    (["report", JUNK], "is a file: name a run's --output-dir"),
    # fine-tuning
    (["finetune"], "--pretrained CKPT is required"),
    (["finetune", "--pretrained", JUNK], "is not a checkpoint: not a torch.save file"),
    (["finetune", "--pretrained", CKPT, "--dataset", "cifar10"], "--dataset cifar10 needs DATA"),
    (["finetune", "--pretrained", CKPT, "--num-heads", "2"], "--num-heads 2: "),
    (["finetune", "--pretrained", CKPT, "--layer-decay", "1.5"], "--layer-decay 1.5 must be in (0, 1]"),
    (["finetune", "--print-recipe", "--recipe", "imagenet"], "argument --recipe: invalid choice: 'imagenet'"),
    # data of the wrong shape
    (["probe", DATA, "--pretrained", CKPT], "has no val/ folder"),
    (["probe", SMALL, "--pretrained", CKPT], "6 training images, fewer than the k=20 neighbours the kNN votes with"),
    (["knn", SMALL, "--pretrained", CKPT, "--output", "k.json"], "6 training images, fewer than the k=200"),
    (["knn", "--pretrained", CKPT, "--train-size", "150", "--output", "k.json"], "150 training images (--train-size "
     "150), fewer than the k=200"),
    # paths of the wrong kind, for every path argument: a file where a folder belongs and the reverse
    *[([cmd, JUNK, *extra], "is a file, not a folder") for cmd, extra in (
        ("pretrain", ["-b", "16"]), ("lincls", ["--pretrained", CKPT]), ("knn", ["--pretrained", CKPT]),
        ("probe", ["--pretrained", CKPT]), ("finetune", ["--pretrained", CKPT]),
        ("finetune", ["--pretrained", CKPT, "--dataset", "cifar10"]))],
    *[([cmd, *extra, "--output-dir", out], message) for cmd, extra in (
        ("pretrain", ["-b", "16"]), ("lincls", ["--pretrained", CKPT]), ("finetune", ["--pretrained", CKPT]))
      for out, message in ((JUNK, "is a file, not a folder"), (JUNK_SUB, "/junk.bin, which is a file, not a folder"),
                           ("", "--output-dir '' is empty: name a folder"))],
    (["pretrain", "-b", "16", "--knn-every", "1", "--knn-data", JUNK], "is a file, not a folder"),
    (["pretrain", "-b", "16", "--engine-config", RUN], "/run is a folder, not a file"),
    (["plan", "--engine-config", RUN], "/run is a folder, not a file"),
    (["finetune", "--pretrained", CKPT, "--engine-config", RUN], "/run is a folder, not a file"),
    (["knn", "--pretrained", CKPT, "--output", RUN], "/run is a folder; name the file to write"),
    (["convert", "--to", "deit", CKPT, f"{JUNK_SUB}.pth"], "/junk.bin, which is a file, not a folder"),
    (["convert", "--to", "universal", RUN, JUNK_SUB], "/junk.bin, which is a file, not a folder"),
    (["report", JUNK_SUB], "is missing"),
    # a folder this user cannot write (root: one under /sys, which refuses even root)
    (["pretrain", *COMMON_TINY_RUN, "--output-dir", RO], RO),
    (["finetune", "--pretrained", CKPT, "--output-dir", RO], RO),
    (["convert", "--to", "deit", CKPT, RO_FILE], RO_FILE),
    (["knn", "--pretrained", CKPT, "--output", RO_FILE, "-j", "0"], RO_FILE),
    # convert never overwrites its input, nor a folder
    (["convert", "--to", "deit", CKPT, CKPT], "is the input; write the deit checkpoint to another path"),
    (["convert", "--to", "timm", CKPT, "."], "is a folder; name the file to write"),
]
if not torch.cuda.is_available():
    CASES.append((["pretrain", "--device", "cuda", "-b", "16", "-j", "0"],
                  "--device cuda was asked for, but torch sees no CUDA device"))


@pytest.fixture
def files(tmp_path: Path) -> dict[str, str]:
    (tmp_path / "junk.bin").write_bytes(b"\x00\x01 not a checkpoint " * 8)
    (tmp_path / "engine.json").write_text(json.dumps({"engine": "ddp"}))
    (tmp_path / "fairscale.json").write_text(json.dumps({"engine": "fairscale"}))
    (tmp_path / "typo.json").write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 1},
                                                    "zero_optimizaton": {"stage": 2}}))
    (tmp_path / "compile.json").write_text(json.dumps({"engine": "ddp", "compile": True}))
    (tmp_path / "ds_compile.json").write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 1},
                                                          "moco_scale": {"compile": True}}))
    (tmp_path / "utf16.txt").write_bytes("worker-1 slots=8\n".encode("utf-16"))
    (tmp_path / "bom.txt").write_bytes("worker-1 slots=8\n".encode("utf-8-sig"))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    for name, (cfg, _) in DS_WRONG.items():
        text = json.dumps({"train_batch_size": "auto", **cfg}).replace("@FILE", str(tmp_path / "junk.bin"))
        (tmp_path / f"{name[1:]}.json").write_text(text)
    torch.manual_seed(0)
    model = build_moco(**TINY_VIT)
    kwargs = dict(TINY_VIT)
    torch.save({"epoch": 1, "arch": kwargs["arch"], "moco_scale": {"model": kwargs, "step": 1},
                "state_dict": {f"module.{k}": v for k, v in model.state_dict().items()}}, tmp_path / "ckpt.pth.tar")
    (tmp_path / "data" / "train" / "a").mkdir(parents=True)  # train/ without val/
    Image.new("RGB", (36, 36), (30, 20, 90)).save(tmp_path / "data" / "train" / "a" / "0.png")
    for split, c, i in ((s, c, i) for s in ("train", "val") for c in "ab" for i in range(3 if s == "train" else 1)):
        (tmp_path / "small" / split / c).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (36, 36), (60 * i, 20, 90)).save(tmp_path / "small" / split / c / f"{i}.png")
    if os.geteuid() == 0:  # permissions do not stop root; sysfs refuses a new entry to anyone
        read_only = "/sys/moco-scale-test"
    else:
        (tmp_path / "ro").mkdir()
        (tmp_path / "ro").chmod(0o555)
        read_only = str(tmp_path / "ro")
    return {JUNK: str(tmp_path / "junk.bin"), JSON: str(tmp_path / "engine.json"), CKPT: str(tmp_path / "ckpt.pth.tar"),
            DATA: str(tmp_path / "data"), FAIRSCALE: str(tmp_path / "fairscale.json"),
            TYPO: str(tmp_path / "typo.json"), COMPILE: str(tmp_path / "compile.json"),
            DS_COMPILE: str(tmp_path / "ds_compile.json"),
            UTF16: str(tmp_path / "utf16.txt"), BOM: str(tmp_path / "bom.txt"), RUN: str(tmp_path / "run"),
            JUNK_SUB: str(tmp_path / "junk.bin" / "x"), f"{JUNK_SUB}.pth": str(tmp_path / "junk.bin" / "x.pth"),
            SMALL: str(tmp_path / "small"), RO: read_only, RO_FILE: f"{read_only}/out.pth",
            **{name: str(tmp_path / f"{name[1:]}.json") for name in DS_WRONG}}


def test_the_table_covers_every_command():
    print(f"{len(CASES)} bad-input cases")
    assert {argv[0] for argv, _ in CASES} >= {"pretrain", "plan", "lincls", "probe", "convert", "finetune"}


@pytest.mark.parametrize("argv,message", CASES, ids=[" ".join(a) for a, _ in CASES])
def test_bad_input_gets_one_line_and_exit_2(argv, message, files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv, message = [files.get(a, a) for a in argv], files.get(message, message)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    try:
        code = main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert err and err[-1].startswith(f"moco-scale {argv[0]}: error: ") and message in err[-1], err[-3:]
    assert "weights_only=False" not in "\n".join(err) and "Traceback" not in "\n".join(err)
    assert {p: p.read_bytes() for p in before} == before  # nothing given to it was changed


def test_images_are_read_as_the_user_sees_them_or_refused_by_name(tmp_path):
    """A 16-bit grayscale PNG (PIL's RGB conversion clips it to white) is scaled to 8 bits; a float TIFF (it
    converts to black) is refused naming the file and its mode, or skipped and counted with --skip-bad-data."""
    import numpy as np
    from PIL import Image

    from moco_scale.commands.pretrain import main
    from moco_scale.data.datasets import DataError, image_folder

    ramp = np.arange(48 * 48, dtype=np.uint16).reshape(48, 48) * 28
    root = tmp_path / "data" / "train" / "a"
    root.mkdir(parents=True)
    Image.fromarray(ramp).save(root / "deep.png")
    seen = np.asarray(image_folder(str(tmp_path / "data" / "train"))[0][0])
    assert seen.shape == (48, 48, 3) and np.array_equal(seen[..., 1], (ramp >> 8).astype(np.uint8))
    for i in range(15):
        Image.new("RGB", (40, 40), (i * 10, 20, 90)).save(root / f"{i}.png")
    Image.fromarray(np.random.rand(40, 40).astype(np.float32)).save(root / "float.tiff")
    with pytest.raises(DataError, match=r"float\.tiff faithfully: mode F \(32-bit float"):
        image_folder(str(tmp_path / "data" / "train"))[16]
    args = ["pretrain", str(tmp_path / "data"), "-a", "vit_tiny", "--patch-size", "8", "--embed-dim", "32", "--depth",
            "1", "--num-heads", "2", "--moco-dim", "16", "--moco-mlp-dim", "32", "--image-size", "32", "-b", "17",
            "--max-steps", "1", "-j", "0", "--device", "cpu", "--optimizer", "adamw"]
    assert main([*args[1:], "--output-dir", str(tmp_path / "r1")]) == 2
    assert main([*args[1:], "--output-dir", str(tmp_path / "r2"), "--skip-bad-data"]) == 0
    summary = json.loads((tmp_path / "r2" / "summary.json").read_text())
    assert summary["skipped_images"] >= 1
