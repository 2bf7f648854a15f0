"""Resumable checkpoint folders: the manager every command saves through, and what it saves.

A resumable checkpoint is a folder DIR/checkpoints/step_00001234/ holding the engine's own layout
(torch.distributed.checkpoint for DDP and FSDP, DeepSpeed's format for ZeRO), one RNG file per rank and
meta.json: the trainer's state (its position in the run, the step being the truth, and what must match to
continue it) with the world size and the size of every file. It is written as a hidden .tmp folder and
renamed only after every rank finished, then the `latest` pointer moves; a folder whose files do not match
meta.json is incomplete and skipped by --resume auto.

The manager also decides when to save (every --save-every steps, each epoch end, a stop signal) and when to
export the command's single file (the reference's checkpoint.pth.tar: `export_every`), as torchtitan's
checkpointer does for its Stateful parts.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from moco_scale.checkpoint.io import NoSpaceError, atomic_write_text, is_disk_full, load_checkpoint

if TYPE_CHECKING:
    from moco_scale.dist import DistContext
    from moco_scale.engines.base import Engine

FORMAT = "moco-scale-checkpoint/1"
META = "meta.json"
LATEST = "latest"
EXPORT_EVERY = ("epoch", "end", "never")


class Stateful(Protocol):
    """A part whose state goes into meta.json (the trainer: step and what it is derived from)."""

    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


# -- folders ------------------------------------------------------------------------------------------
def _rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _barrier(ctx: DistContext) -> None:
    if ctx.is_distributed:
        torch.distributed.barrier()


def manifest(folder: Path) -> dict[str, int]:
    return {str(f.relative_to(folder)): f.stat().st_size for f in sorted(folder.rglob("*"))
            if f.is_file() and f.name != META}


def verify(folder: Path) -> dict[str, Any]:
    """meta.json of a complete checkpoint folder; ValueError naming the first missing or damaged file."""
    meta_file = folder / META
    if not meta_file.is_file():
        raise ValueError(f"checkpoint {folder} is incomplete: no {META} (a save that did not finish)")
    try:
        meta = json.loads(meta_file.read_text())
    except ValueError as e:
        raise ValueError(f"checkpoint {meta_file} is corrupt: {e}") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"checkpoint {meta_file} has format {meta.get('format')!r}, expected {FORMAT!r}")
    for name, size in meta["files"].items():
        f = folder / name
        if not f.is_file():
            raise ValueError(f"checkpoint {folder} is damaged: {f} is missing")
        if f.stat().st_size != size:
            raise ValueError(f"checkpoint {folder} is damaged: {f} has {f.stat().st_size} bytes, "
                             f"{size} were written")
    return meta


def step_folders(root: Path) -> list[Path]:
    """Finished folders (renamed from .tmp), newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def _step_of(folder: Path) -> int:
    return int(folder.name.removeprefix("step_"))


def find_latest(root: Path) -> Path | None:
    """The newest complete checkpoint under `root` (its checkpoints/ folder is looked into too).

    The `latest` pointer is tried first; an incomplete or damaged folder is skipped with a warning. Folders
    moved aside (superseded/, damaged/) are never candidates."""
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    candidates = step_folders(root)
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip()) in candidates:
        first = root / pointer.read_text().strip()
        candidates = [first] + [c for c in candidates if c != first]
    for folder in candidates:
        try:
            verify(folder)
            return folder
        except ValueError as e:
            warnings.warn(f"--resume: skipping {e}", stacklevel=2)
    return None


def move_aside(folder: Path, under: Path) -> Path:
    """Move `folder` into `under`, never onto an earlier folder of the same name (a name.1, name.2, ...)."""
    under.mkdir(parents=True, exist_ok=True)
    dst, n = under / folder.name, 0
    while dst.exists():
        n += 1
        dst = under / f"{folder.name}.{n}"
    os.replace(folder, dst)
    return dst


# -- the manager ----------------------------------------------------------------------------------------
class CheckpointManager:
    """Writes resumable checkpoint folders under DIR/checkpoints, following the run's timeline.

    Retention keeps the newest `keep_last` complete checkpoints; a damaged one is moved to
    checkpoints/damaged/ (never counted, never deleted). A run resumed from step S starts a new timeline:
    the folders after S, from the abandoned one, go to checkpoints/superseded/<time>/ (named in a warning)
    and are never chosen by --resume auto. `latest` always names a folder that exists. A full disk during a
    save removes the partial folder and says which checkpoint is intact. Collectives: call on every rank.
    """

    def __init__(self, run_dir: str | Path, ctx: DistContext, keep_last: int, save_every: int = 0,
                 export_every: str = "never", warn: Callable[[str], None] = print) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.ctx, self.keep_last, self.save_every, self.export_every, self.warn = (ctx, keep_last, save_every,
                                                                                    export_every, warn)
        self.last_saved: int | None = None
        #: an old run moved aside by --overwrite, deleted once this run has its first checkpoint
        self.discard_after_first_save: Path | None = None
        self.engine: Engine | None = None
        self.trainer: Stateful | None = None
        self.exporter: Callable[[], None] | None = None

    def track(self, engine: Engine, trainer: Stateful, exporter: Callable[[], None] | None = None) -> None:
        """The parts a save writes: the engine's files, the trainer's state (meta.json), and the command's
        single-file export (a collective), written on the `export_every` cadence."""
        self.engine, self.trainer, self.exporter = engine, trainer, exporter

    def folder(self, step: int) -> Path:
        return self.root / f"step_{step:08d}"

    # -- when --------------------------------------------------------------------------------------
    def after_step(self, step: int) -> None:
        if self.save_every and step % self.save_every == 0:
            self.save()

    def after_epoch(self, last: bool) -> None:
        """An epoch ended (or the run's last step, mid-epoch): save, and export on the cadence."""
        self.save()
        if self.export_every == "epoch" or (self.export_every == "end" and last):
            self.export()

    def export(self) -> None:
        if self.exporter is not None:
            self.exporter()

    # -- timelines and retention -------------------------------------------------------------------
    def start_timeline(self, step: int) -> None:
        """This run continues from `step`: move every later folder (another timeline's) aside. Rank 0 only."""
        if not self.ctx.is_main or not self.root.is_dir():
            return
        later = []
        for folder in (f for f in step_folders(self.root) if _step_of(f) > step):
            try:
                verify(folder)
                later.append(folder)
            except ValueError as e:  # why --resume auto passed it over: not part of any timeline
                moved = move_aside(folder, self.root / "damaged")
                self.warn(f"moco-scale: warning: {e}; moved it to {moved}")
        if later:
            aside = self.root / "superseded" / time.strftime("%Y%m%d-%H%M%S")
            for folder in later:
                move_aside(folder, aside)
            self.warn(f"moco-scale: warning: resuming at step {step}: moved {len(later)} later checkpoint(s) of the "
                      f"abandoned timeline ({', '.join(sorted(f.name for f in later))}) to {aside}")
        self._point_latest()

    def _set_aside(self, folder: Path) -> None:
        """A folder of the step about to be saved, from an earlier run or timeline (an import from a reference
        file re-saves its step at once): a complete one goes to superseded/, a damaged one to damaged/; no save
        ever deletes or replaces a complete checkpoint."""
        try:
            verify(folder)
            moved = move_aside(folder, self.root / "superseded" / time.strftime("%Y%m%d-%H%M%S"))
        except ValueError:
            moved = move_aside(folder, self.root / "damaged")
        self.warn(f"moco-scale: warning: {folder} already existed (an earlier run or timeline); moved it to {moved} "
                  f"rather than replacing it")

    def _point_latest(self) -> None:
        pointer = self.root / LATEST
        complete = [f for f in step_folders(self.root) if (f / META).is_file()]
        if complete:
            atomic_write_text(pointer, complete[0].name)
        else:
            pointer.unlink(missing_ok=True)

    def _retain(self) -> None:
        """Keep the newest `keep_last` complete folders; damaged ones aside, not counted."""
        complete = []
        for folder in step_folders(self.root):
            try:
                verify(folder)
                complete.append(folder)
            except ValueError as e:
                moved = move_aside(folder, self.root / "damaged")
                self.warn(f"moco-scale: warning: {e}; moved it to {moved} (not counted by --keep-last)")
        for old in complete[self.keep_last:]:
            shutil.rmtree(old, ignore_errors=True)
        self._point_latest()

    def discard_aside(self) -> None:
        """Delete the old run --overwrite moved aside: once this run holds a checkpoint, or at its end. Rank 0."""
        if self.ctx.is_main and self.discard_after_first_save is not None:
            shutil.rmtree(self.discard_after_first_save, ignore_errors=True)
            self.discard_after_first_save = None

    # -- saving and loading --------------------------------------------------------------------------
    def save(self) -> Path:
        """A collective: the engine's files, every rank's RNG, then meta.json (the trainer's state) last."""
        position = self.trainer.state_dict()
        final = self.folder(position["step"])
        name, tmp = final.name, self.root / f".{final.name}.tmp"
        if self.last_saved == position["step"] and final.is_dir():
            return final  # an epoch end right after a --save-every or signal save of the same step
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.ctx)
        try:
            self.engine.save(str(tmp))
            torch.save(_rng_state(), tmp / f"rng_rank{self.ctx.rank:05d}.pt")
            _barrier(self.ctx)  # every rank's files are written
            if self.ctx.is_main:
                meta = {"format": FORMAT, **position, "world_size": self.ctx.world_size, "saved_at": time.time(),
                        "files": manifest(tmp)}
                (tmp / META).write_text(json.dumps(meta, indent=2))
        except BaseException as e:
            if not is_disk_full(e):
                raise
            if self.ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            intact = find_latest(self.root) if self.root.is_dir() else None
            raise NoSpaceError(errno.ENOSPC, f"no space left on device while writing {tmp}; removed the partial "
                               f"folder; {intact or 'no earlier checkpoint'} is intact") from None
        if self.ctx.is_main:
            if final.exists():  # the same step written by an earlier run or timeline: kept, never replaced
                self._set_aside(final)
            os.replace(tmp, final)
            atomic_write_text(self.root / LATEST, name)
            self._retain()
            self.discard_aside()
        self.last_saved = position["step"]
        _barrier(self.ctx)
        return final

    def load(self, folder: Path) -> dict[str, Any]:
        """Restore the engine, this rank's RNG and the trainer's state from a verified folder; its meta.json."""
        meta = verify(folder)
        self.engine.load(str(folder), meta["world_size"])
        rng = folder / f"rng_rank{self.ctx.rank:05d}.pt"
        if meta["world_size"] == self.ctx.world_size and rng.is_file():
            _set_rng_state(load_checkpoint(str(rng)))
        self.trainer.load_state_dict(meta)
        return meta
