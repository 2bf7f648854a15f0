"""End to end through `moco-scale pretrain`: one plain process, torchrun and the deepspeed launcher
(real processes, gloo), compared with each other and with the oracle; run output; bad input."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    TINY_VIT,
    TINY_VIT_FLAGS,
    assert_losses_close,
    assert_states_close,
    builtin_batches,
    deepspeed_launcher,
    image_folder,
    read_run,
    run_cli,
    torchrun,
)
from PIL import Image
from reference import Oracle

from moco_scale import build_moco

B, STEPS, EPOCHS, WARMUP, LR = 16, 3, 2, 1, 6.0
COMMON = ["-b", str(B), "--epochs", str(EPOCHS), "--warmup-epochs", str(WARMUP), "--lr", str(LR),
          "--optimizer", "lars", "--moco-m-cos", "--crop-min", "0.2", "-j", "0", "-p", "1",
          "--max-steps", str(STEPS), "--device", "cpu"]
ARCH_FLAGS = {"vit": TINY_VIT_FLAGS, "resnet": ["-a", "resnet_tiny", "--moco-dim", "32", "--moco-mlp-dim", "64"]}
ARCH_KWARGS = {"vit": TINY_VIT, "resnet": dict(arch="resnet_tiny", img_size=32, moco_dim=32, moco_mlp_dim=64)}
#: the plain process runs in the test's own (what a launcher adds is in the others); world 4 through a launcher is
#: test_engines' ZeRO-3 at world 4, and DDP at world 4 runs in-process in test_equivalence
LAUNCHES = {"plain-1": None, "torchrun-2": lambda: torchrun(2), "deepspeed-2": lambda: deepspeed_launcher(2)}
#: launches the ResNet (LARS, synced BN) skips
RESNET_SKIPS = ("deepspeed-2",)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = {}
    for arch in ("vit", "resnet"):
        for name, launcher in LAUNCHES.items():
            if arch == "resnet" and name in RESNET_SKIPS:
                continue
            d = tmp_path_factory.mktemp(f"{arch}-{name}")
            args = [*ARCH_FLAGS[arch], *COMMON, "--output-dir", str(d)]
            if launcher is None:
                from moco_scale.commands.pretrain import main

                assert main(args) == 0
            else:
                res = run_cli(args, launcher=launcher())
                assert res.returncode == 0, res.stderr[-3000:]
                (d / "launch.log").write_text(res.stdout + res.stderr)
            out[arch, name] = d
    return out


def oracle(arch: str):
    batches = builtin_batches(B, STEPS)
    torch.manual_seed(0)
    model = build_moco(**ARCH_KWARGS[arch])
    o = Oracle(model.base_encoder, model.momentum_encoder, model.predictor, T=model.temperature, optimizer="lars",
               base_lr=LR, wd=1e-6, batch=B, epochs=EPOCHS, warmup=WARMUP, m0=0.99, m_cos=True,
               iters_per_epoch=1437 // B)
    return o.train(batches), o.state_dict(), o.first_layer_grad_norms


@pytest.mark.parametrize("arch", ["vit", "resnet"])
def test_every_launch_matches_the_oracle(runs, arch):
    """Losses, final state, and the first layer's gradient norm logged at every step (summed over ranks and
    shards by each engine) against the plain single-process computation."""
    want_losses, want_state, want_norms = oracle(arch)
    for (a, _), d in runs.items():
        if a != arch:
            continue
        losses, state, _ = read_run(d)
        assert_losses_close(losses, want_losses)
        assert_states_close(state, want_state, atol=1e-6)  # zero-mean BN statistics are fp32 noise
        rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
        for row, want in zip(rows, want_norms, strict=True):
            assert want and len([k for k in row if k.startswith("grad_norm/")]) == len(want)
            for name, value in want.items():
                assert row[f"grad_norm/{name}"] == pytest.approx(value, rel=1e-4), (d.name, row["step"], name)


def test_run_output(runs):
    d = runs["vit", "torchrun-2"]
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["args"]["moco_m"] == 0.99 and cfg["args"]["weight_decay"] == 1e-6 and cfg["args"]["image_size"] == 32
    assert cfg["resolved"]["world_size"] == 2 and cfg["resolved"]["per_rank_batch"] == 8
    assert cfg["resolved"]["lr"] == pytest.approx(LR * B / 256) and cfg["engine"]["engine"] == "ddp"
    rows = [json.loads(line) for line in open(d / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert {"step", "epoch", "loss", "lr", "moco_m", "img_per_s", "img_per_s_per_rank", "data_wait_frac",
            "tflops_per_rank", "mfu", "peak_mem_gib", "eta_s"} <= set(rows[0])
    assert rows[0]["img_per_s_per_rank"] == pytest.approx(rows[0]["img_per_s"] / 2)
    assert rows[0]["mfu"] is None and rows[0]["tflops_per_rank"] > 0 and rows[0]["peak_mem_gib"] > 0.1  # CPU: no peak
    assert rows[-1]["eta_s"] == 0 and rows[0]["eta_s"] > 0
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0 and rows[1]["epoch"] == pytest.approx(1 / 89)
    assert any((d / "tensorboard").iterdir())
    _, _, ckpt = read_run(d)
    # 3 of 89 steps: no epoch is complete (the reference's "epoch" is the next one to start); the step is recorded
    assert ckpt["epoch"] == 0 and ckpt["arch"] == "vit_tiny" and {"optimizer", "scaler"} <= set(ckpt)
    assert ckpt["moco_scale"]["step"] == STEPS and ckpt["moco_scale"]["iters_per_epoch"] == 89
    prefixes = {k.split(".")[1] for k in ckpt["state_dict"]}
    assert prefixes == {"base_encoder", "momentum_encoder", "predictor"}
    assert json.loads((d / "summary.json").read_text())["steps"] == STEPS
    # not a terminal (as a SLURM log): no bar redraws, one plain line per logged step, the start and end lines
    log = (d / "launch.log").read_text()
    assert "\r" not in log
    lines = [line for line in log.splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == [f"{s}/{STEPS}" for s in range(1, STEPS + 1)], log
    assert all(f" {k} " in lines[0] for k in ("loss", "lr", "m", "img/s", "data", "mem", "eta"))
    assert "moco-scale: vit_tiny, world 2" in log and f"moco-scale: done at step {STEPS}/{STEPS}" in log


def test_report_writes_plots_with_data_and_a_summary(runs, tmp_path):
    res = run_cli(["report", str(runs["vit", "torchrun-2"]), "--out", str(tmp_path)])
    assert res.returncode == 0, res.stderr[-2000:]
    md = (tmp_path / "report.md").read_text()
    assert "vit_tiny" in md and "world 2" in md and "| loss |" in md
    for name in ("loss", "lr", "momentum", "throughput", "memory", "grad_norm"):
        assert f"({name}.png)" in md
        image = Image.open(tmp_path / f"{name}.png").convert("RGB")
        assert image.size == (600, 350)
        # a plotted line: pixels of matplotlib's first colour (tab:blue), not only axes and text
        pixels = np.asarray(image, dtype=np.int32)
        blue = int((np.abs(pixels - np.array([31, 119, 180])).max(axis=-1) < 30).sum())
        assert blue > 50, (name, blue)


def test_report_names_a_folder_without_metrics(tmp_path):
    res = run_cli(["report", str(tmp_path)])
    assert res.returncode == 2 and f"{tmp_path}/metrics.jsonl does not exist" in res.stderr, res.stderr


def test_batch_not_divisible_by_world_size(tmp_path):
    res = run_cli([*TINY_VIT_FLAGS, *COMMON, "-b", "15", "--output-dir", str(tmp_path)], launcher=torchrun(2))
    assert res.returncode != 0
    assert "global batch -b 15 must be a positive multiple of the world size 2" in res.stderr


@pytest.mark.parametrize("flags,message", [
    (["-a", "vit_gigantic"], "unknown architecture -a vit_gigantic; known: resnet18"),
    (["/no/such/dataset"], "data folder /no/such/dataset does not exist"),
    (["--engine-config", "ds_configs/missing.json"], "engine config ds_configs/missing.json does not exist"),
])
def test_bad_input_errors(tmp_path, flags, message, capsys):
    rc, err = in_process(capsys, [*COMMON, "--output-dir", str(tmp_path), *flags])
    assert rc == 2 and message in err, err[-2000:]


def in_process(capsys, args: list[str]) -> tuple[int, str]:
    """`moco-scale pretrain ARGS` in the test's process (a launch adds nothing to an argument check):
    the exit code and stderr."""
    from moco_scale.commands.pretrain import main

    capsys.readouterr()
    rc = main(args)
    return rc, capsys.readouterr().err


def test_bad_engine_config_names_file_and_key(tmp_path, capsys):
    cfg = tmp_path / "typo.json"
    cfg.write_text('{"engine": "ddp", "precison": "bf16"}')
    rc, err = in_process(capsys, [*TINY_VIT_FLAGS, *COMMON, "--engine-config", str(cfg), "--output-dir",
                                  str(tmp_path / "o")])
    assert rc == 2 and f"engine config {cfg}: unknown key(s) precison" in err


def test_corrupt_image_is_named(tmp_path):
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (36, 36), (60 * i, 20, 90)).save(tmp_path / "data" / "train" / c / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    args = ["pretrain", str(tmp_path / "data"), *TINY_VIT_FLAGS, *COMMON, "-b", "9", "--image-size", "32",
            "--output-dir", str(tmp_path / "o")]
    for _ in range(2):  # loader workers (-j 2): one line, not the worker's traceback; --resume auto says the same
        res = run_cli([*args, "-j", "2"])
        broken = tmp_path / "data" / "train" / "b" / "broken.jpg"
        assert res.returncode == 2 and res.stderr.strip().splitlines()[-1].startswith(
            f"moco-scale pretrain: error: cannot read image {broken} ("), res.stderr
        assert res.stderr.strip().endswith("--skip-bad-data skips and counts such files"), res.stderr
        assert "Traceback" not in res.stderr and "worker" not in res.stderr, res.stderr
        args = [*args, "--resume", "auto"]
    res = run_cli([*args[:-2], "--skip-bad-data", "--overwrite", "--max-steps", "1"])
    assert res.returncode == 0, res.stderr[-2000:]
    # one step of the whole folder in one batch: the broken image is drawn once, replaced once, counted once
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["skipped_images"] == 1


def test_skipped_images_are_counted_over_workers_and_ranks(tmp_path):
    """Two ranks with two loader workers each, one step over the whole folder: the one skip is counted once,
    whichever rank and worker drew it (each worker counts in its own slot; the ranks' counts are summed)."""
    for c in ("a", "b"):
        (tmp_path / "data" / "train" / c).mkdir(parents=True)
        for i in range(5 if c == "a" else 4):
            Image.new("RGB", (36, 36), (60 * i, 20, 90)).save(tmp_path / "data" / "train" / c / f"{i}.png")
    (tmp_path / "data" / "train" / "b" / "broken.jpg").write_bytes(b"\xff\xd8 truncated")
    args = [str(tmp_path / "data"), *TINY_VIT_FLAGS, *COMMON, "-b", "10", "--image-size", "32", "-j", "4",
            "--max-steps", "1", "--skip-bad-data", "--output-dir", str(tmp_path / "o")]
    res = run_cli(args, launcher=torchrun(2))
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["skipped_images"] == 1 and summary["steps"] == 1


def test_corrupt_image_on_one_rank_ends_the_job_without_hanging(tmp_path):
    """Every image is in the first global batch, so one rank meets a broken file while the other
    waits in a collective: the launcher must end the job promptly, not after --dist-timeout."""
    args = [str(image_folder(tmp_path / "data", good=8, broken=2)), *TINY_VIT_FLAGS, *COMMON, "-b", "10",
            "--image-size", "32", "--dist-timeout", "600", "--output-dir", str(tmp_path / "o")]
    res = run_cli(args, launcher=torchrun(2), timeout=120)
    assert res.returncode != 0 and "cannot read image" in res.stderr and "broken" in res.stderr


def test_existing_run_is_not_overwritten(tmp_path, capsys):
    args = [*TINY_VIT_FLAGS, *COMMON, "--max-steps", "1", "--output-dir", str(tmp_path)]
    assert in_process(capsys, args)[0] == 0
    rc, err = in_process(capsys, args)
    assert rc == 2 and "already holds a run" in err

