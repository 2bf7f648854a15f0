"""Resumable checkpoints under real launchers: exact mid-epoch resume per engine, FSDP resharding to
other world sizes, DeepSpeed across world sizes through the consolidated reference file, damaged
and half-written checkpoints, and refusals that name the way out."""

from __future__ import annotations

import io
import json
import shutil
import warnings
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest
import torch
from helpers import (
    TINY_VIT,
    TINY_VIT_FLAGS,
    assert_states_close,
    build_engine,
    deepspeed_launcher,
    engine_config,
    read_run,
    run_cli,
    spawn,
    torchrun,
)

from moco_scale import build_moco
from moco_scale.checkpoint.reference import consolidate
from moco_scale.engines import load_engine_config

B, ITERS = 16, 1437 // 16
COMMON = [*TINY_VIT_FLAGS, "-b", str(B), "--epochs", "2", "--warmup-epochs", "1", "--lr", "1.0", "--wd", "0.1",
          "--optimizer", "adamw", "--moco-m-cos", "--crop-min", "0.2", "-j", "0", "-p", "1", "--device", "cpu"]
LAUNCH = {"ddp": lambda w: torchrun(w), "fsdp": lambda w: torchrun(w), "zero3": lambda w: deepspeed_launcher(w)}


def pretrain(config: str, world: int, out: Path, *extra: str) -> str:
    """Under the engine's launcher; DDP at world 1 in this process (the cheapest way to test the driver: the
    command line's own path is test_cli's). Returns what it printed, warnings included."""
    args = [*COMMON, "--engine-config", engine_config(config), "--output-dir", str(out), *extra]
    if config == "ddp" and world == 1:
        from moco_scale.commands.pretrain import main

        printed = io.StringIO()
        with redirect_stdout(printed), redirect_stderr(printed), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            rc = main(args)
        log = printed.getvalue() + "\n".join(str(w.message) for w in caught)
        assert rc == 0, log[-3000:]
        return log
    res = run_cli(args, launcher=LAUNCH[config](world))
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout + res.stderr


def plain(out: Path, *extra: str):
    """One plain process with the default (DDP) engine; returns the completed process."""
    return run_cli(["pretrain", *COMMON, "--output-dir", str(out), *extra])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Per engine (FSDP and ZeRO-3 at world 2, DDP as one process): 6 steps straight, and 3 steps, stop
    (mid-epoch), resume auto to 6."""
    made: dict[str, tuple[Path, Path]] = {}

    def get(config: str) -> tuple[Path, Path]:
        if config not in made:
            root, world = tmp_path_factory.mktemp(config), 1 if config == "ddp" else 2
            pretrain(config, world, root / "straight", "--max-steps", "6")
            pretrain(config, world, root / "split", "--max-steps", "3", "--save-every", "2")
            shutil.copytree(root / "split" / "checkpoints" / "step_00000003", root / "step3")  # before pruning
            log = pretrain(config, world, root / "split", "--max-steps", "6", "--save-every", "2", "--resume",
                           "auto")
            assert "resumed from" in log and "step_00000003" in log
            made[config] = root / "straight", root / "split"
        return made[config]

    return get


@pytest.mark.parametrize("config", ["ddp", "fsdp", "zero3"])
def test_resume_mid_epoch_continues_exactly(runs, config):
    straight, split = runs(config)
    losses, state, _ = read_run(straight)
    resumed_losses, resumed_state, _ = read_run(split)
    assert len(losses) == 6 and resumed_losses == pytest.approx(losses, rel=1e-6, abs=0)
    assert_states_close(resumed_state, state, rtol=1e-6)
    ckpts = split / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000004", "step_00000006"]  # --keep-last 2
    assert (ckpts / "latest").read_text() == "step_00000006"
    assert not list(ckpts.glob(".*.tmp"))


def _load_and_dump(ctx, folder: str, saved_world: int, out: str) -> None:
    cfg = load_engine_config(engine_config("fsdp"), B, ctx.world_size)
    torch.manual_seed(123)  # another initialisation: the load must replace every tensor
    engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
    engine.load(folder, saved_world)
    model = {k: v.detach().clone() for k, v in engine.full_state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    optimizer = get_optimizer_state_dict(engine.model, engine.optimizer,
                                         options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if ctx.is_main:
        torch.save({"model": model, "optimizer": optimizer}, out)
    engine.close()


# 2 -> 2 across engines: test_engine_contract
@pytest.mark.parametrize("world", [1, pytest.param(4, marks=pytest.mark.slow)])
def test_fsdp_checkpoint_reshards_to_another_world_size(runs, world, tmp_path):
    """Saved by 2 ranks, loaded by 1 or 4: parameters and optimizer state as saved; training continues."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    straight, split = runs("fsdp")
    step3 = split.parent / "step3"
    dcp_to_torch_save(str(step3), str(tmp_path / "saved.pt"))
    saved = torch.load(tmp_path / "saved.pt", weights_only=False)
    spawn(_load_and_dump, world, str(step3), 2, str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=False)
    assert set(loaded["model"]) == set(saved["model"])
    for k, v in saved["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    state = saved["optimizer"]["state"]
    assert state and set(loaded["optimizer"]["state"]) == set(state)
    for name, slots in state.items():
        for slot, v in slots.items():
            assert torch.equal(torch.as_tensor(loaded["optimizer"]["state"][name][slot]), torch.as_tensor(v))

    log = pretrain("fsdp", world, tmp_path / "run", "--max-steps", "6", "--resume", str(step3))
    assert "resumed from" in log
    # the losses of steps 4-6 follow the uninterrupted world-2 run (parameters are not compared after the
    # steps: AdamW turns reduction-order noise on zero-gradient elements into lr-sized moves, see helpers)
    losses, _, _ = read_run(tmp_path / "run")
    want, _, _ = read_run(straight)
    assert losses == pytest.approx(want[3:], rel=1e-5)


def _load_universal_and_dump(ctx, folder: str, out: str) -> None:
    cfg = load_engine_config(engine_config("zero3"), B, ctx.world_size)
    cfg.deepspeed["checkpoint"] = {"load_universal": True}  # what the driver sets for a universal folder
    torch.manual_seed(123)
    engine = build_engine(build_moco(**TINY_VIT), "adamw", 0.1, cfg, ctx)
    engine.load(folder, 2)
    model = {k: v.detach().clone() for k, v in engine.full_state_dict().items()}
    if ctx.is_main:
        torch.save(model, out)
    engine.close()


def test_zero3_changes_world_size_through_a_universal_checkpoint(runs, tmp_path):
    """ZeRO-3 at world 2 -> world 1: refused as it is, with the ways out; through DeepSpeed's universal
    form every tensor arrives (fp32 momentum encoder and BN statistics from momentum.pt) and the
    next losses follow the uninterrupted run."""
    straight, split = runs("zero3")
    step3 = split.parent / "step3"
    res = plain(tmp_path / "refused", "--engine-config", engine_config("zero3"), "--max-steps", "6",
                "--resume", str(step3))
    assert res.returncode == 2 and "2 DeepSpeed ranks" in res.stderr
    assert "convert --to universal" in res.stderr and "convert --to reference" in res.stderr

    universal = tmp_path / "universal"
    res = run_cli(["convert", "--to", "universal", str(step3), str(universal)])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "at any world size under ZeRO-3" in res.stdout  # what it supports, not "any ZeRO stage"
    spawn(_load_universal_and_dump, 1, str(universal), str(tmp_path / "loaded.pt"))
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    saved = {k.removeprefix("module."): v for k, v in consolidate(step3)["state_dict"].items()}
    assert set(loaded) == set(saved)
    for k, v in saved.items():
        assert torch.equal(loaded[k].to(v.dtype), v), k

    log = pretrain("zero3", 1, tmp_path / "run", "--max-steps", "6", "--resume", str(universal))
    assert "resumed from" in log
    want, _, _ = read_run(straight)
    assert read_run(tmp_path / "run")[0] == pytest.approx(want[3:], rel=1e-5)
    res = plain(tmp_path / "z2", "--engine-config", engine_config("zero2"), "--max-steps", "6", "--resume",
                str(universal))
    assert res.returncode == 2 and "into ZeRO-3 only" in res.stderr


def test_a_published_style_file_round_trips_through_resume(runs, tmp_path):
    """convert --to reference, strip it to what the published files hold, --resume it under ZeRO-3 at
    another world size: the imported checkpoint holds the file's tensors bit for bit (momentum encoder
    included) and the run warns that the optimizer starts fresh."""
    _, split = runs("zero3")
    ref = tmp_path / "full.pth.tar"
    res = run_cli(["convert", "--to", "reference", str(split.parent / "step3"), str(ref)])
    assert res.returncode == 0, res.stderr[-2000:]
    full = torch.load(ref, weights_only=True)
    # as the published files: no optimizer, no scaler, no moco-scale record; 'epoch' = the next epoch to run
    published = {"epoch": 1, "arch": full["arch"], "state_dict": full["state_dict"]}
    torch.save(published, ref)
    log = pretrain("zero3", 1, tmp_path / "run", "--max-steps", str(ITERS), "--resume", str(ref))
    assert "optimizer starts fresh" in log and "step 89 (epoch 1, batch 0)" in log
    imported = consolidate(tmp_path / "run" / "checkpoints" / f"step_{ITERS:08d}")["state_dict"]
    assert set(imported) == set(published["state_dict"])
    for k, v in published["state_dict"].items():
        assert torch.equal(imported[k], v), k
    assert any(not torch.equal(v, published["state_dict"][k.replace("momentum_encoder", "base_encoder")])
               for k, v in published["state_dict"].items() if "momentum_encoder" in k)


def in_process(capsys, out: Path, *extra: str) -> tuple[int, str]:
    """`plain` without the process start (DDP at world 1 runs in the test's process): exit code and output."""
    from moco_scale.commands.pretrain import main

    capsys.readouterr()
    rc = main([*COMMON, "--output-dir", str(out), *extra])
    out, err = capsys.readouterr()
    return rc, out + err


def test_resume_auto_skips_damaged_and_half_written_checkpoints(tmp_path, capsys):
    run = tmp_path / "run"
    assert in_process(capsys, run, "--max-steps", "3", "--save-every", "1", "--keep-last", "3")[0] == 0
    ckpts = run / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000003"
    files = json.loads((ckpts / "step_00000003" / "meta.json").read_text())["files"]
    biggest = max(files, key=files.get)  # the engine's largest state file, whatever the layout names it
    with open(ckpts / "step_00000003" / biggest, "r+b") as f:  # killed half-way through a write
        f.truncate(1000)
    rc, err = in_process(capsys, run, "--max-steps", "3", "--resume", str(ckpts / "step_00000003"))
    assert rc == 2 and str(ckpts / "step_00000003" / biggest) in err

    shutil.copytree(ckpts / "step_00000002", tmp_path / "copy")
    (tmp_path / "copy" / "meta.json").write_text("{not json")
    rc, err = in_process(capsys, run, "--max-steps", "3", "--resume", str(tmp_path / "copy"))
    assert rc == 2 and "meta.json is corrupt" in err

    (ckpts / "step_00000002" / "meta.json").unlink()  # a save that never completed
    (ckpts / ".step_00000004.tmp").mkdir()  # one that never got renamed
    with pytest.warns(UserWarning) as caught:  # a subprocess prints these on stderr
        rc, log = in_process(capsys, run, "--max-steps", "1", "--resume", "auto")
    log += "\n".join(str(w.message) for w in caught)
    assert rc == 0
    assert "skipping checkpoint" in log and f"{Path(biggest).name} has 1000 bytes" in log and "no meta.json" in log
    assert f"resumed from {ckpts / 'step_00000001'} at step 1" in log


def test_resume_refuses_another_model_or_engine(runs, tmp_path, capsys):
    _, split = runs("zero3")  # DDP and FSDP share a layout (test_engine_contract); ZeRO-3 partitions do not
    rc, err = in_process(capsys, tmp_path / "a", "--max-steps", "6", "--resume", str(split.parent / "step3"))
    assert rc == 2, err[-2000:]
    assert "written by deepspeed ZeRO-3 and this run uses torch.distributed.checkpoint" in err
    assert "convert --to reference" in err
    _, split = runs("fsdp")
    step3 = split.parent / "step3"
    args = [a if a != "64" else "32" for a in COMMON]  # --embed-dim 32 (and --moco-mlp-dim 32)
    res = run_cli(["pretrain", *args, "--engine-config", engine_config("fsdp"), "--output-dir", str(tmp_path / "b"),
                   "--max-steps", "6", "--resume", str(step3)])
    assert res.returncode == 2 and "another model" in res.stderr and "embed_dim 64 there, 32 here" in res.stderr
    rc, err = in_process(capsys, tmp_path / "c", "--resume", str(tmp_path / "nothing"))
    assert rc == 2 and "nothing does not exist" in err


def test_convert_reads_every_engines_checkpoint_folder(runs, tmp_path):
    """convert --to reference from a sharded folder gives the tensors the run's own full file holds."""
    for config in ("ddp", "fsdp", "zero3"):
        straight, _ = runs(config)
        out = tmp_path / f"{config}.pth.tar"
        res = run_cli(["convert", "--to", "reference", str(straight / "checkpoints" / "step_00000006"), str(out)])
        assert res.returncode == 0, res.stderr[-2000:]
        got = torch.load(out, weights_only=True)["state_dict"]
        want = torch.load(straight / "checkpoint.pth.tar", weights_only=True)["state_dict"]
        assert set(got) == set(want)
        for k, v in want.items():
            assert torch.equal(got[k], v.float() if v.is_floating_point() else v), (config, k)
        meta = json.loads((straight / "checkpoints" / "step_00000006" / "meta.json").read_text())
        assert meta["step"] == 6 and "iter" not in meta and "epoch" not in meta  # derived from the step


def _agree(ctx, folders: list[str | None], out: str) -> None:
    from pathlib import Path

    from moco_scale.checkpoint.manager import verify
    from moco_scale.checkpoint.resume import Resume, agree_on_resume

    mine = folders[ctx.rank]
    resume, changed = agree_on_resume(None if mine is None else Resume(Path(mine), meta=verify(Path(mine))), ctx)
    Path(out, f"rank{ctx.rank}.txt").write_text(f"{resume and resume.path}|{changed}")


def test_every_rank_resumes_the_folder_rank_0_chose(tmp_path):
    """--resume auto is resolved by each rank before the group exists; a rank whose filesystem shows an older
    newest folder (attribute caching) takes rank 0's choice, and a rank that saw one where rank 0 saw none starts
    from scratch with it."""
    from helpers import COMMON_TINY_RUN, run_cli, spawn

    run = tmp_path / "run"
    res = run_cli(["pretrain", *COMMON_TINY_RUN, "--max-steps", "2", "--save-every", "1", "--keep-last", "3",
                   "--output-dir", str(run)])
    assert res.returncode == 0, res.stderr[-2000:]
    step1, step2 = (str(run / "checkpoints" / f"step_{s:08d}") for s in (1, 2))
    spawn(_agree, 2, [step2, step1], str(tmp_path))
    assert (tmp_path / "rank0.txt").read_text() == f"{step2}|False"
    assert (tmp_path / "rank1.txt").read_text() == f"{step2}|True"
    spawn(_agree, 2, [None, step1], str(tmp_path))
    assert (tmp_path / "rank1.txt").read_text() == "None|True"


def test_resume_names_what_changed(tmp_path):
    """Another --optimizer is refused (its state cannot carry over); another --seed or --epochs continues with a
    warning naming the old and new value and what follows from it."""
    from helpers import COMMON_TINY_RUN, run_cli

    run = ["pretrain", *COMMON_TINY_RUN, "--output-dir", str(tmp_path)]
    res = run_cli(run)
    assert res.returncode == 0, res.stderr[-2000:]
    res = run_cli([*run, "--resume", "auto", "--optimizer", "lars", "--max-steps", "2"])
    assert res.returncode == 2 and "trained with --optimizer adamw, this run asks for lars" in res.stderr, res.stderr
    res = run_cli([*run, "--resume", "auto", "--seed", "5", "--epochs", "30", "--max-steps", "2"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert "--seed 0 there, 5 here: the data order and augmentation follow the new seed from step 1" in res.stderr
    assert "--epochs" in res.stderr and "the lr and momentum schedules span the new length" in res.stderr
