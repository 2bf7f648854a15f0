"""Launching as on a cluster, with real launchers and processes on one machine: two "nodes" under the
deepspeed launcher (hostfile, --no_ssh --node_rank) and torchrun --nnodes 2, srun-style tasks from
SLURM's variables, SIGTERM (save and exit 0, then --resume auto) and kill -9 of one rank."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import BIN, REPO, assert_losses_close, builtin_batches, engine_config, free_port
from test_engines import COMMON, STEPS, B, oracle_run  # the same command line and its oracle


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT") and not k.startswith("SLURM_")}
    return {**out, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
            "PATH": f"{BIN}:{out.get('PATH', '')}", **extra}


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in open(run / "metrics.jsonl")]


def start(cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env(**extra), cwd=REPO,
                            start_new_session=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[int]:
    return [p.wait(timeout=timeout) for p in procs]


@pytest.fixture(scope="module")
def single_node() -> list[float]:
    """What every launch below must reproduce: the oracle's first 3 losses for this command line."""
    return oracle_run(builtin_batches(B, STEPS))[0]


def test_two_nodes_under_the_deepspeed_launcher(single_node, tmp_path):
    """`deepspeed --hostfile` with two hosts, each "node" started with --no_ssh --node_rank N."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(free_port())
    cmd = [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--master_addr", "127.0.0.1",
           "--master_port", port, "--module", "moco_scale", "pretrain", *COMMON, "--max-steps", "3",
           "--engine-config", engine_config("zero3"), "--output-dir", str(tmp_path / "run")]
    procs = [start([*cmd[:3], "--node_rank", str(n), *cmd[3:]], tmp_path / f"node{n}.log") for n in (0, 1)]
    assert finish(procs) == [0, 0], (tmp_path / "node1.log").read_text()[-3000:]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["resolved"]["world_size"] == 2
    assert_losses_close(losses(tmp_path / "run"), single_node)


def test_two_nodes_under_torchrun(single_node, tmp_path):
    port = str(free_port())
    procs = [start([str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                    "--master_addr", "127.0.0.1", "--master_port", port, "-m", "moco_scale", "pretrain", *COMMON,
                    "--max-steps", "3", "--engine-config", engine_config("fsdp"), "--output-dir",
                    str(tmp_path / "run")], tmp_path / f"node{n}.log") for n in (0, 1)]
    assert finish(procs) == [0, 0], (tmp_path / "node1.log").read_text()[-3000:]
    assert_losses_close(losses(tmp_path / "run"), single_node)


def srun(world: int, port: str, args: list[str], tmp_path: Path, **extra: str) -> list[subprocess.Popen]:
    """Tasks as `srun --ntasks W` starts them: the plain program, SLURM's variables, no launcher."""
    return [start([str(BIN / "moco-scale"), "pretrain", *COMMON, *args], tmp_path / f"task{r}.log",
                  SLURM_PROCID=str(r), SLURM_NTASKS=str(world), SLURM_LOCALID=str(r),
                  SLURM_STEP_TASKS_PER_NODE=f"{world}(x1)", SLURM_JOB_ID="1234", MASTER_PORT=port, **extra)
            for r in range(world)]


def test_sigterm_saves_on_every_rank_and_resume_continues(single_node, tmp_path):
    """srun-style tasks: SIGTERM to every process of the job step (as SLURM does before preemption) makes
    each rank save one checkpoint and exit 0; --resume auto then runs to the end."""
    run = tmp_path / "run"
    args = ["--engine-config", engine_config("fsdp"), "--output-dir", str(run), "--max-steps", "150",
            "--dist-timeout", "60"]
    procs = srun(2, str(free_port()), args, tmp_path, MASTER_ADDR="127.0.0.1")
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "task0.log").read_text()
        time.sleep(0.5)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    assert finish(procs, timeout=120) == [0, 0], (tmp_path / "task1.log").read_text()[-3000:]
    assert losses(run)[:3] == pytest.approx(single_node, rel=1e-5)  # the ranks came from SLURM's variables
    log = (tmp_path / "task0.log").read_text()
    assert "SIGTERM: saved" in log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and 3 <= summary["steps"] < 150
    saved = json.loads((run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "meta.json").read_text())
    assert saved["step"] == summary["steps"] and saved["world_size"] == 2

    procs = srun(2, str(free_port()), [*args[:-4], "--max-steps", str(summary["steps"] + 2), "--resume", "auto"],
                 tmp_path, MASTER_ADDR="127.0.0.1")
    assert finish(procs) == [0, 0], (tmp_path / "task0.log").read_text()[-3000:]
    assert f"at step {summary['steps']}" in (tmp_path / "task0.log").read_text()  # "resumed from ... at step N"
    assert json.loads((run / "summary.json").read_text())["steps"] == summary["steps"] + 2


def test_srun_without_master_addr_is_a_clear_error(tmp_path):
    procs = srun(2, str(free_port()), ["--max-steps", "1", "--output-dir", str(tmp_path / "run")], tmp_path)
    assert finish(procs, timeout=120) == [2, 2]
    assert "MASTER_ADDR is not set" in (tmp_path / "task0.log").read_text()


def test_start_up_failures_are_named_not_taken_for_a_dying_rank(tmp_path):
    """srun-style tasks that cannot form the group used to say "another rank died ... --resume auto". Now: the
    master port in use, a rank that never starts, rank 0 out of reach, each named with address, port and time."""
    import socket

    def task(rank: int, world: int, port: int, name: str) -> subprocess.Popen:
        return start([str(BIN / "moco-scale"), "pretrain", *COMMON, "--max-steps", "1", "--dist-timeout", "5",
                      "--output-dir", str(tmp_path / name)], tmp_path / f"{name}.log", SLURM_PROCID=str(rank),
                     SLURM_NTASKS=str(world), SLURM_LOCALID="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))

    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy, free = taken.getsockname()[1], free_port()
    procs = [task(0, 2, busy, "in_use"), task(0, 2, free, "alone"), task(1, 2, free_port(), "unreachable")]
    assert finish(procs, timeout=180) == [2, 2, 2]
    taken.close()
    last = {name: (tmp_path / f"{name}.log").read_text().strip().splitlines()[-1]
            for name in ("in_use", "alone", "unreachable")}
    assert f"MASTER_PORT {busy} on 127.0.0.1 is in use" in last["in_use"] and "--master_port" in last["in_use"]
    assert f"only 1 of 2 ranks joined 127.0.0.1:{free} within --dist-timeout 5 s" in last["alone"]
    # and while it waits (up to --dist-timeout, 30 min by default) it says so, after min(60 s, half of that)
    assert (f"rank 0: still forming the process group of 2 at 127.0.0.1:{free} after 2 s; it waits up to "
            "--dist-timeout 5 s") in (tmp_path / "alone.log").read_text()
    assert "rank 1 of 2" in last["unreachable"] and "store at 127.0.0.1:" in last["unreachable"]
    assert not any("another rank" in line or "--resume auto" in line for line in last.values()), last


def test_kill_9_of_one_rank_ends_the_job(tmp_path):
    """srun-style (no launcher to notice): the survivor's next collective fails and it exits non-zero
    with a message naming the cause, well within --dist-timeout."""
    run = tmp_path / "run"
    procs = srun(2, str(free_port()), ["--engine-config", engine_config("fsdp"), "--output-dir", str(run),
                                       "--max-steps", "500", "--dist-timeout", "60"], tmp_path,
                 MASTER_ADDR="127.0.0.1")
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 2):
        assert time.time() < deadline, (tmp_path / "task0.log").read_text()
        time.sleep(0.5)
    killed_at = time.time()
    procs[1].send_signal(signal.SIGKILL)
    code = procs[0].wait(timeout=120)
    assert code != 0 and time.time() - killed_at < 60
    assert "another rank" in (tmp_path / "task0.log").read_text()


def test_first_ctrl_c_saves_like_sigterm_and_the_folder_asks_for_resume(tmp_path):
    """One plain process: a first SIGINT (Ctrl-C) lost everything since the last save; now it saves and exits 0.
    Starting again in that folder without --resume names --resume auto first (not only --overwrite)."""
    run, args, summary = signal_a_running_run(tmp_path, signal.SIGINT)
    assert summary["interrupted"] and summary["steps"] < 100000
    assert (run / "checkpoints" / f"step_{summary['steps']:08d}" / "meta.json").is_file()
    reference = run / "checkpoint.pth.tar"  # written at epoch ends only: named only where it exists
    assert summary["checkpoint"] == (str(reference) if reference.exists() else None)
    from moco_scale.commands.pretrain import main
    from moco_scale.config import ConfigError
    from moco_scale.train.run import prepare_output_dir

    with pytest.raises(ConfigError, match="interrupted run .* --resume auto"):
        prepare_output_dir(str(run), overwrite=False, resuming=False)
    # in-process, one plain process: a resume with no step left logs no loss: strict JSON, null, not NaN
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        os.environ.pop(key, None)
    assert main([*args[2:], "--resume", "auto", "--max-steps", str(summary["steps"])]) == 0
    strict = json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))
    assert strict["steps"] == summary["steps"] and strict["final_loss"] is None


def signal_a_running_run(tmp_path: Path, sig: signal.Signals) -> tuple[Path, list[str], dict]:
    """One plain process, signalled once it has logged twice: it says it saved, exits 0, and its summary says
    it was interrupted. Returns the run folder, its command line and summary.json."""
    run = tmp_path / "run"
    args = [str(BIN / "moco-scale"), "pretrain", *COMMON, "--output-dir", str(run), "--epochs", "100",
            "--max-steps", "100000"]
    proc = start(args, tmp_path / "log")
    deadline = time.time() + 120
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 2):
        assert time.time() < deadline and proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.2)
    proc.send_signal(sig)
    assert finish([proc], timeout=120) == [0], (tmp_path / "log").read_text()[-3000:]
    assert f"{sig.name}: saved" in (tmp_path / "log").read_text()
    return run, args, json.loads((run / "summary.json").read_text())


def test_sighup_saves_like_sigterm(tmp_path):
    """A closed terminal or ssh session (SIGHUP) saves and exits 0, as SIGTERM does."""
    run, _, summary = signal_a_running_run(tmp_path, signal.SIGHUP)
    assert summary["interrupted"] and (run / "checkpoints" / f"step_{summary['steps']:08d}" / "meta.json").is_file()


def test_sigterm_to_the_deepspeed_launcher_alone_stops_its_ranks(tmp_path):
    """On one node the deepspeed runner forwards no signal: killed alone, it left its launch process and the ranks
    training, orphaned, to the end. The ranks watch it: they save, exit 0, and no process of the job is left."""
    import psutil

    run = tmp_path / "run"
    cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()), "--module", "moco_scale",
           "pretrain", *COMMON, "--output-dir", str(run), "--epochs", "100", "--max-steps", "100000"]
    proc = start(cmd, tmp_path / "log")
    deadline = time.time() + 180
    while not ((run / "metrics.jsonl").exists() and len(losses(run)) >= 2):
        assert time.time() < deadline and proc.poll() is None, (tmp_path / "log").read_text()[-3000:]
        time.sleep(0.2)
    tree = psutil.Process(proc.pid).children(recursive=True)
    assert len(tree) >= 3  # the launch process and two ranks
    proc.send_signal(signal.SIGTERM)  # the runner alone, not its process group
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs(tree, timeout=120)
    log = (tmp_path / "log").read_text()
    assert not alive, log[-3000:]
    assert "the deepspeed launcher" in log and "SIGTERM: saved" in log, log[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and (run / "checkpoints" / f"step_{summary['steps']:08d}" / "meta.json").is_file()


def test_sigterm_is_acted_on_when_no_step_logs(tmp_path):
    """-p longer than the run: the ranks used to agree on logging steps only, so a SIGTERM was never acted on. They
    also agree every ~30 s of steps (every 50 steps until the first agreement measures them)."""
    run = tmp_path / "run"
    args = ["--output-dir", str(run), "--epochs", "1000", "--max-steps", "100000", "-p", "100000",
            "--save-every", "5", "--dist-timeout", "60"]
    procs = srun(2, str(free_port()), args, tmp_path, MASTER_ADDR="127.0.0.1")
    deadline = time.time() + 180
    while not (run / "checkpoints" / f"step_{10:08d}" / "meta.json").exists():
        assert time.time() < deadline and all(p.poll() is None for p in procs), (tmp_path / "task0.log").read_text()
        time.sleep(0.5)
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    assert finish(procs, timeout=150) == [0, 0], (tmp_path / "task0.log").read_text()[-3000:]
    assert "SIGTERM: saved" in (tmp_path / "task0.log").read_text()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and summary["steps"] == 50  # the first agreement without a logging step


def test_sigterm_during_start_up_exits_at_once_with_one_line(tmp_path):
    """Before the training loop's handler exists (imports, data scan, engine build, taking the folder) a SIGTERM
    used to kill the process wherever it was. Now it exits at once with 143 and one line saying nothing was
    saved; what it had written is whole, and the folder is free for the next launch."""
    run = tmp_path / "run"
    args = ["pretrain", *COMMON, "--output-dir", str(run), "--max-steps", "2"]
    proc = start([str(BIN / "moco-scale"), *args], tmp_path / "early.log")
    time.sleep(0.3)  # importing torch
    proc.send_signal(signal.SIGTERM)
    assert finish([proc], timeout=60) == [143]
    assert (tmp_path / "early.log").read_text().strip().splitlines()[-1] == (
        "moco-scale pretrain: stopped by SIGTERM during start-up, before the first step: nothing was saved")
    # the signal once the folder is taken (config.json written), before the first step
    hook = ("import os, signal, sys\nimport moco_scale.train.pretrain as p\nfrom moco_scale.cli import main\n"
            "real = p.open_run\ndef taken(*a, **k):\n    out = real(*a, **k)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n    return out\n"
            "p.open_run = taken\nsys.exit(main(sys.argv[1:]))\n")
    proc = start([str(BIN / "python"), "-c", hook, *args], tmp_path / "late.log")
    assert finish([proc], timeout=120) == [143], (tmp_path / "late.log").read_text()[-3000:]
    log = (tmp_path / "late.log").read_text()
    assert "Traceback" not in log and log.strip().splitlines()[-1].endswith("before the first step: nothing was saved")
    assert json.loads((run / "config.json").read_text())["resolved"]
    assert not (run / "checkpoints").exists() and not [p for p in run.rglob("*tmp*")]
    proc = start([str(BIN / "moco-scale"), *args, "--resume", "auto"], tmp_path / "again.log")
    assert finish([proc], timeout=120) == [0], (tmp_path / "again.log").read_text()[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 2
