"""What --resume names and whether it continues this run: a resumable folder (its meta.json must match the
model, batch and data, and the engine must read its layout), a run folder (its newest complete checkpoint),
or a reference-format file (weights, and the step it continues at)."""

from __future__ import annotations

import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moco_scale.checkpoint.io import load_checkpoint
from moco_scale.checkpoint.manager import find_latest, verify
from moco_scale.checkpoint.reference import checked_state_dict
from moco_scale.config import ConfigError

if TYPE_CHECKING:
    from moco_scale.engines.config import EngineConfig
    from moco_scale.models.parts import TrainModule


@dataclass
class Resume:
    """A checkpoint folder to load (`meta` its meta.json), or a reference-format file (`ckpt` its contents)."""

    path: Path
    meta: dict[str, Any] | None = None
    ckpt: dict[str, Any] | None = None

    @property
    def is_file(self) -> bool:
        return self.ckpt is not None


def _latest(root: Path, is_main: bool) -> Path | None:
    with warnings.catch_warnings():
        warnings.simplefilter("default" if is_main else "ignore")
        return find_latest(root)


def find_resume(resume: str | None, output_dir: str, is_main: bool) -> Resume | None:
    """What --resume names: None (a fresh start), a verified folder, or a loaded reference-format file."""
    if resume is None:
        return None
    if resume == "auto":
        folder = _latest(Path(output_dir), is_main)
        if folder is None:
            if is_main:
                print(f"moco-scale: --resume auto: no complete checkpoint in {output_dir}/checkpoints, "
                      "starting from scratch", file=sys.stderr)
            return None
        return Resume(folder, meta=verify(folder))
    path = Path(resume)
    if path.is_file():
        return Resume(path, ckpt=load_checkpoint(str(path)))
    if not path.is_dir():
        raise ConfigError(f"--resume {path} does not exist")
    if not (path / "meta.json").exists():
        folder = _latest(path, is_main)
        if folder is None:
            raise ConfigError(f"--resume {path}: no complete checkpoint folder (step_*/meta.json) in it")
        path = folder
    return Resume(path, meta=verify(path))


def resume_on_pretrained(resume: str | None, output_dir: str, pretrained: str, identity: dict[str, Any], job: str,
                         agreed: tuple[Resume | None] | None = None, file_hint: str = "") -> Resume | None:
    """--resume (or `agreed`: rank 0's choice) for a run built on a pretrained checkpoint (linear evaluation,
    fine-tuning): a checkpoint folder that started from the same one (path and content), or what it holds would
    be reported for the wrong model. `job` names the run ("linear evaluation", "fine-tuning")."""
    found = find_resume(resume, output_dir, int(os.environ.get("RANK", "0")) == 0) if agreed is None else agreed[0]
    if found is None:
        return None
    if found.is_file:
        raise ConfigError(f"--resume {found.path}: {job} resumes a checkpoint folder ({output_dir}/checkpoints/"
                          f"step_*), not a file{file_hint}")
    if found.meta.get("pretrained") != identity:
        raise ConfigError(f"--resume {found.path} ran {job} on another pretrained checkpoint "
                          f"({(found.meta.get('pretrained') or {}).get('path')}), not --pretrained {pretrained}; "
                          "write into another --output-dir, or pass --overwrite without --resume")
    return found


def check_resumable(resume: Resume, model: dict[str, Any], global_batch: int, dataset_size: int,
                    engine: EngineConfig) -> EngineConfig:
    """A checkpoint folder continues this run only with the same model, batch, data and an engine that reads its
    layout; returns the engine config that reads it (the engine config's answer)."""
    meta, source = resume.meta, resume.path
    diff = [f"{k} {meta['model'].get(k)!r} there, {v!r} here" for k, v in model.items() if meta["model"].get(k) != v]
    if diff:
        raise ConfigError(f"--resume {source} is from another model: {'; '.join(diff)}")
    if meta["global_batch"] != global_batch:
        raise ConfigError(f"--resume {source} was trained with -b {meta['global_batch']}, this run has -b "
                          f"{global_batch}: the schedules and data order would not continue")
    if meta["dataset_size"] != dataset_size:
        raise ConfigError(f"--resume {source} saw {meta['dataset_size']} training images, this data has "
                          f"{dataset_size}")
    return engine.resume_config(meta, source)


def reference_weights(resume: Resume, model: TrainModule, arch: str) -> dict[str, torch.Tensor]:
    """A reference-format file's tensors (published pretrained files included), checked against `model` (on the
    meta device: names and shapes), for the engine to start from."""
    ckpt, path = resume.ckpt, resume.path
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"--resume {path} holds no 'state_dict': not a MoCo v3 pretraining checkpoint")
    if ckpt.get("arch", arch) != arch:
        raise ConfigError(f"--resume {path} holds {ckpt['arch']}, this run is -a {arch}")
    state, _ = checked_state_dict(ckpt, f"--resume {path}", model, hint="; pass the size flags it was trained with")
    return state


def run_folder(path: str) -> str:
    """The run folder a checkpoint belongs to (a run folder, a step folder in it, or a file's folder)."""
    path = os.path.abspath(path)
    folder = path if os.path.isfile(os.path.join(path, "config.json")) else os.path.dirname(path)
    return os.path.dirname(folder) if os.path.basename(folder) == "checkpoints" else folder


def agree_on_resume(resume: Resume | None, ctx: Any) -> tuple[Resume | None, bool]:
    """Rank 0's choice of the folder to resume, for every rank (once the process group exists): each rank
    picked `--resume auto`'s newest folder on its own, and on a shared filesystem with attribute caching they
    can disagree. A rank that cannot read rank 0's folder says so. Returns the resume and whether it changed here."""
    import torch.distributed as dist

    if not (ctx.is_distributed and ctx.world_size > 1):
        return resume, False
    mine = None if resume is None else str(resume.path)
    choice = [mine]
    dist.broadcast_object_list(choice, src=0)
    if choice[0] == mine:
        return resume, False
    if choice[0] is None:
        print(f"moco-scale: rank {ctx.rank}: rank 0 found no checkpoint to resume, this rank found {mine}: starting "
              "from scratch as rank 0 does", file=sys.stderr)
        return None, True
    path = Path(choice[0])
    if resume is not None and resume.is_file:
        return resume, False  # an explicit file: the same name on every rank
    try:
        meta = verify(path)
    except Exception as e:  # noqa: BLE001 - any reason this rank cannot read it is the message
        raise ConfigError(f"rank {ctx.rank} cannot read {path}, the checkpoint rank 0 resumes ({e}); the run folder "
                          "must be on a filesystem every node shares") from None
    print(f"moco-scale: rank {ctx.rank}: resuming {path} as rank 0 does (this rank saw {mine})", file=sys.stderr)
    return Resume(path, meta=meta), True


def changed_settings(meta: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What a resumed run changes that it may (the state carries over; the run continues differently): each a line
    naming the old and new value and what follows from it. Keys a checkpoint does not record are not compared."""
    step = meta.get("step")
    what = {"precision": "the weights and optimizer state carry over in fp32; the arithmetic changes",
            "seed": "the data order and augmentation follow the new seed",
            "epochs": "the lr and momentum schedules span the new length, so the run leaves the saved schedule"}
    flags = {"precision": "the engine config's precision", "seed": "--seed", "epochs": "--epochs"}
    return [f"{flags[k]} {meta[k]} there, {now[k]} here: {text} from step {step}" for k, text in what.items()
            if k in meta and k in now and meta[k] != now[k]]
