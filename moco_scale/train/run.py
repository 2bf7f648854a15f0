"""The run folder every training command writes: made (or taken over with --overwrite, the old run kept
until the new one has saved), its resolved config.json, and the ranks waiting until it exists."""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from moco_scale.config import ConfigError
from moco_scale.dist import DistContext


def _interrupted(run: Path) -> bool:
    """A run that saved checkpoints but did not finish: killed (no summary.json) or stopped by a signal."""
    if not any((run / "checkpoints").glob("step_*")):
        return False
    try:
        return bool(json.loads((run / "summary.json").read_text()).get("interrupted"))
    except (OSError, ValueError):
        return True


def prepare_output_dir(path: str, overwrite: bool, resuming: bool) -> Path | None:
    """The run folder, made; with --overwrite the old run is moved aside (returned), to be deleted only once this
    run has written its first checkpoint: a run that fails at its first batch loses nothing."""
    aside = None
    if os.path.exists(os.path.join(path, "config.json")) and not resuming:
        if not overwrite and _interrupted(Path(path)):
            raise ConfigError(f"--output-dir {path} holds an interrupted run with checkpoints: continue it with "
                              "--resume auto, or choose another folder (--overwrite would delete its checkpoints)")
        if not overwrite:
            raise ConfigError(f"--output-dir {path} already holds a run (config.json); choose another "
                              "folder or pass --overwrite")
        stem = f"{os.path.abspath(path).rstrip(os.sep)}.overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
        aside = next(Path(f"{stem}{suffix}") for suffix in ("", *(f".{i}" for i in range(1, 1000)))
                     if not os.path.exists(f"{stem}{suffix}"))
        os.replace(path, aside)
    os.makedirs(path, exist_ok=True)
    return aside


class RunLock:
    """One run per folder: rank 0 holds an exclusive lock on DIR/.lock (flock, so a killed run leaves none
    behind: the OS releases it with the process) for as long as the process lives or until `release()`. The
    file says who holds it, for the error another launch gets."""

    FILE = ".lock"
    _held: dict[str, RunLock] = {}  # by folder: a later run in this process (tests, notebooks) takes it over

    def __init__(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        key = os.path.realpath(path)
        if key in RunLock._held:
            RunLock._held.pop(key).release()  # this process's earlier run has ended (or failed)
        self.fd = os.open(os.path.join(path, self.FILE), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(self.fd)
            raise ConfigError(f"--output-dir {path} is in use by a live run ({holder}); wait for it to end, stop "
                              "it, or choose another folder") from None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()}, pid {os.getpid()}\n".encode(), 0)
        RunLock._held[key] = self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the flock
            self.fd = None


def open_run(path: str, ctx: DistContext, config: dict[str, Any], overwrite: bool, resuming: bool) -> Path | None:
    """Rank 0 takes the folder (its lock, then --overwrite or the checks of prepare_output_dir) and writes
    config.json; every rank learns whether that worked before any writes into it. Returns what --overwrite moved
    aside (the manager deletes it after the first save)."""
    aside, error = None, None
    if ctx.is_main:
        try:
            lock = RunLock(path)
            # --resume auto may find no checkpoint yet (a crash before the first save): the folder is this run's
            aside = prepare_output_dir(path, overwrite, resuming)
            if aside is not None:  # the lock file went aside with the old run: hold the new folder's
                RunLock(path)
                lock.release()
            with open(os.path.join(path, "config.json"), "w") as f:
                json.dump(config, f, indent=2)
        except (ConfigError, OSError) as e:
            error = e
    if ctx.is_distributed:  # one answer for every rank: none waits on a rank 0 that gave up
        failed = torch.tensor([0.0 if error is None else 1.0], device=ctx.device)
        torch.distributed.all_reduce(failed, op=torch.distributed.ReduceOp.MAX)
        if failed.item() and error is None:
            raise ConfigError(f"rank 0 could not take the run folder {path} (its error is above)")
    if isinstance(error, OSError):
        raise ConfigError(f"--output-dir {path}: {error.strerror or error}") from error
    if error is not None:
        raise error
    return aside


def release_run(path: str) -> None:
    """The run in this process is over: its folder is free for the next one."""
    lock = RunLock._held.pop(os.path.realpath(path), None)
    if lock is not None:
        lock.release()
