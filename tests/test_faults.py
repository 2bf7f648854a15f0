"""Nothing saved is lost (issue 16's data-loss cases, with real files, in-process: a launcher adds nothing):
after each fault every complete checkpoint that existed is still there or moved aside, `latest` names a folder
that exists, and --resume auto resumes the current timeline."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from helpers import BIN, COMMON_TINY_RUN, REPO, deepspeed_launcher, engine_config
from PIL import Image

from moco_scale.checkpoint import manager as checkpoint
from moco_scale.checkpoint.manager import find_latest
from moco_scale.commands.pretrain import main

RUN = [a for a in COMMON_TINY_RUN if a not in ("--max-steps", "1")]


def pretrain(out: Path, *extra: str) -> int:
    return main([*RUN, "--output-dir", str(out), *extra])


def steps(ckpts: Path) -> list[str]:
    return sorted(p.name for p in ckpts.glob("step_*"))


def every_complete(root: Path) -> dict[int, list[Path]]:
    """Every folder holding a meta.json under the run (kept or moved aside), by step."""
    found: dict[int, list[Path]] = {}
    for meta in root.rglob("meta.json"):
        found.setdefault(json.loads(meta.read_text())["step"], []).append(meta.parent)
    return found


def test_a_resume_from_an_older_step_starts_a_new_timeline(tmp_path, capsys):
    run, ckpts = tmp_path / "R", tmp_path / "R" / "checkpoints"
    assert pretrain(run, "--max-steps", "5", "--save-every", "1", "--keep-last", "4") == 0
    assert steps(ckpts) == [f"step_0000000{i}" for i in (2, 3, 4, 5)]
    before = every_complete(run)
    capsys.readouterr()
    assert pretrain(run, "--max-steps", "3", "--save-every", "1", "--keep-last", "4",
                    "--resume", str(ckpts / "step_00000002")) == 0
    err = capsys.readouterr().err
    assert "abandoned timeline (step_00000003, step_00000004, step_00000005)" in err
    superseded = list((ckpts / "superseded").iterdir())
    assert len(superseded) == 1 and steps(superseded[0]) == ["step_00000003", "step_00000004", "step_00000005"]
    assert steps(ckpts) == ["step_00000002", "step_00000003"]  # the resumed run's own step 3, and its source
    assert (ckpts / "latest").read_text() == "step_00000003" and (ckpts / "step_00000003" / "meta.json").is_file()
    assert all(step in every_complete(run) for step in before)  # nothing complete was deleted
    assert find_latest(ckpts) == ckpts / "step_00000003"  # not the abandoned step 5
    assert pretrain(run, "--max-steps", "4", "--save-every", "1", "--keep-last", "4", "--resume", "auto") == 0
    out, err = capsys.readouterr()
    assert f"resumed from {ckpts / 'step_00000003'} at step 3" in out + err


def test_retention_moves_a_damaged_folder_aside_and_keeps_good_ones(tmp_path, capsys):
    run, ckpts = tmp_path / "R", tmp_path / "R" / "checkpoints"
    assert pretrain(run, "--max-steps", "3", "--save-every", "1", "--keep-last", "3") == 0
    for f in (ckpts / "step_00000003").glob("*.distcp"):
        f.unlink()
    capsys.readouterr()
    assert pretrain(run, "--max-steps", "3", "--save-every", "1", "--keep-last", "2", "--resume", "auto") == 0
    out, err = capsys.readouterr()
    assert f"resumed from {ckpts / 'step_00000002'} at step 2" in out + err
    assert steps(ckpts) == ["step_00000002", "step_00000003"]  # the good step 2 kept, step 3 written anew
    assert verify_ok(ckpts / "step_00000003") and verify_ok(ckpts / "step_00000002")
    damaged = list((ckpts / "damaged").iterdir())
    assert len(damaged) == 1 and damaged[0].name.startswith("step_00000003") and "damaged" in err


def verify_ok(folder: Path) -> bool:
    checkpoint.verify(folder)
    return True


def test_overwrite_keeps_the_old_run_until_the_new_one_has_saved(tmp_path, capsys):
    run = tmp_path / "R"
    assert pretrain(run, "--max-steps", "2", "--save-every", "1") == 0
    data = tmp_path / "broken" / "train" / "a"
    data.mkdir(parents=True)
    for i in range(16):
        Image.new("RGB", (40, 40), (i * 10, 20, 90)).save(data / f"{i}.jpg")
    (data / "3.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    capsys.readouterr()
    assert main([*RUN, str(tmp_path / "broken"), "--output-dir", str(run), "--max-steps", "2", "--overwrite"]) != 0
    assert "3.jpg" in capsys.readouterr().err
    aside = list(tmp_path.glob("R.overwritten-*"))
    assert len(aside) == 1 and steps(aside[0] / "checkpoints") == ["step_00000001", "step_00000002"]
    # a run that saves: what it moved aside (the failed run's folder) goes once it holds a checkpoint
    assert main([*RUN, "--output-dir", str(run), "--max-steps", "1", "--overwrite"]) == 0
    assert steps(run / "checkpoints") == ["step_00000001"]
    assert list(tmp_path.glob("R.overwritten-*")) == aside  # the old run's checkpoints are still there


def test_a_full_disk_names_the_intact_checkpoint_and_leaves_no_partial_folder(tmp_path, capsys, monkeypatch):
    run, ckpts = tmp_path / "R", tmp_path / "R" / "checkpoints"
    assert pretrain(run, "--max-steps", "1") == 0
    real_save = torch.save

    def full(obj, f, *args, **kwargs):
        if "rng_rank" in str(f):  # after the engine's files: the folder is half written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    capsys.readouterr()
    assert pretrain(run, "--max-steps", "2", "--resume", "auto") == 1
    err = capsys.readouterr().err
    assert "no space left on device while writing" in err and f"{ckpts / 'step_00000001'} is intact" in err
    assert steps(ckpts) == ["step_00000001"] and not list(ckpts.glob(".*.tmp"))
    assert (ckpts / "latest").read_text() == "step_00000001"
    verify_ok(ckpts / "step_00000001")


@pytest.mark.parametrize("engine", ["ddp", "zero2"])
def test_a_re_save_of_an_existing_step_moves_the_complete_one_aside(tmp_path, capsys, engine):
    """A run resumed from its own reference file into its folder saves the imported state as step_N at once;
    the complete step_N already there (its optimizer state included: under ZeRO-2 the re-save's is empty) is
    moved aside, byte for byte, never deleted or replaced."""
    run, ckpts = tmp_path / "R", tmp_path / "R" / "checkpoints"

    def launch(*args: str) -> tuple[int, str]:  # ZeRO-2 as the case was found: two ranks, the deepspeed launcher
        if engine == "ddp":
            capsys.readouterr()
            return pretrain(run, *args), capsys.readouterr().err
        res = subprocess.run([*deepspeed_launcher(2), *RUN, "--engine-config", engine_config(engine), "--output-dir",
                              str(run), *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                             env={**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"})
        return res.returncode, res.stdout + res.stderr

    assert launch("--max-steps", "2", "--save-every", "1", "--keep-last", "3")[0] == 0
    old = {f.name: f.read_bytes() for f in (ckpts / "step_00000002").rglob("*") if f.is_file()}
    code, err = launch("--max-steps", "3", "--resume", str(run / "checkpoint.pth.tar"))
    assert code == 0, err[-3000:]
    assert f"{ckpts / 'step_00000002'} already existed" in err
    kept = [folder for folder in every_complete(run)[2] if "superseded" in folder.parts]
    assert len(kept) == 1 and {f.name: f.read_bytes() for f in kept[0].rglob("*") if f.is_file()} == old
    assert steps(ckpts) == ["step_00000002", "step_00000003"]  # the new step 2 and 3 (--keep-last 2)


def test_one_run_per_folder_and_a_killed_run_leaves_no_lock(tmp_path):
    """A second launch into the folder of a live run stops at once naming the live run's host and pid; once
    that run is killed (kill -9: no cleanup) the folder is free."""
    import signal
    import time

    run = tmp_path / "R"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([str(BIN / "moco-scale"), "pretrain", *RUN, "--max-steps", "5000", "--output-dir",
                              str(run)], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not (run / "config.json").exists() and time.time() < deadline:
            time.sleep(0.2)
        second = main([*RUN, "--output-dir", str(run), "--resume", "auto", "--lr", "0.5"])
        assert second == 2
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert main([*RUN, "--output-dir", str(run), "--resume", "auto", "--max-steps", "1"]) == 0


def test_the_live_run_is_named(tmp_path, capsys):
    """The refusal names the folder and the holder (host, pid), read from the lock file."""
    import fcntl
    import socket

    run = tmp_path / "R"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    os.write(fd, b"host elsewhere, pid 4242\n")
    fcntl.flock(fd, fcntl.LOCK_EX)  # another open file description: a live run, as far as flock is concerned
    try:
        assert main([*RUN, "--output-dir", str(run), "--max-steps", "1"]) == 2
        err = capsys.readouterr().err
        assert f"--output-dir {run} is in use by a live run (host elsewhere, pid 4242)" in err
    finally:
        os.close(fd)
    assert main([*RUN, "--output-dir", str(run), "--max-steps", "1"]) == 0
    assert f"host {socket.gethostname()}, pid {os.getpid()}" in (run / ".lock").read_text()


def test_a_launch_waiting_on_a_stale_build_lock_names_the_file(tmp_path, capfd):
    """A torch without pytorch#190543 (2.11) builds DeepSpeed's op under a lock file whose existence blocks: a
    build killed midway left every later launch waiting forever without a word. The wait now names the file (real
    files, a real thread)."""
    import time

    from moco_scale.engines.extensions import build_locks, explain_build_wait

    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    lock.touch()
    assert build_locks(tmp_path) == [lock]
    with explain_build_wait(after_s=0.2, root=tmp_path, blocking=True, rank=1):
        time.sleep(1.0)
    err = capfd.readouterr().err
    assert f"rank 1: DeepSpeed's op build has waited 0 s on the lock file(s) {lock} (from " in err and "remove" in err
    for blocking, sleep in ((True, 0.0), (False, 1.0)):  # a build that returns in time, a torch with an OS lock
        with explain_build_wait(after_s=0.2, root=tmp_path, blocking=blocking):
            time.sleep(sleep)
        time.sleep(0.5)
        assert capfd.readouterr().err == ""


def test_the_shipped_engine_jsons_are_checked_without_importing_every_deepspeed_module(tmp_path):
    """Checking the keys of a config used to import every DeepSpeed config module (walk_packages) on every rank
    and every `plan`: now only a key the parser does not ask for does (and a typo still gets its hint)."""
    from moco_scale.config import ConfigError
    from moco_scale.engines import deepspeed_config
    from moco_scale.engines.config import load_engine_config

    deepspeed_config._KNOWN.clear()
    for path in sorted(Path(__file__).parents[1].glob("ds_configs/zero*.json")):
        load_engine_config(str(path), global_batch=16, world=2)
    assert not deepspeed_config._KNOWN
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({"train_batch_size": "auto", "zero_optimizaton": {"stage": 2}}))
    with pytest.raises(ConfigError, match=r"'zero_optimizaton' \(did you mean 'zero_optimization'\?\)"):
        load_engine_config(str(typo), global_batch=16, world=2)
    assert deepspeed_config._KNOWN
