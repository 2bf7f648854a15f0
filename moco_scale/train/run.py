"""The run folder every training command writes: made (or taken over with --overwrite, the old run kept
until the new one has saved), its resolved config.json, and the ranks waiting until it exists."""

from __future__ import annotations

import json
import os
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


def open_run(path: str, ctx: DistContext, config: dict[str, Any], overwrite: bool, resuming: bool) -> Path | None:
    """Rank 0 makes the folder and writes config.json; every rank waits until it exists. Returns what
    --overwrite moved aside (the manager deletes it after the first save)."""
    aside = None
    if ctx.is_main:
        # --resume auto may find no checkpoint yet (a crash before the first save): the folder is still this run's
        aside = prepare_output_dir(path, overwrite, resuming)
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if ctx.is_distributed:
        torch.distributed.barrier()  # the folder exists before any rank writes into it
    return aside
