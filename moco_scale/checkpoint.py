"""Checkpoints: the reference trainer's single file, and moco-scale's sharded resumable folders.

A resumable checkpoint is a folder DIR/checkpoints/step_00001234/ holding the engine's own
layout (one file for DDP, torch.distributed.checkpoint shards for FSDP, DeepSpeed's format
for ZeRO), one RNG file per rank and meta.json (position in the run, model, world size, and
the size of every file). It is written as a hidden .tmp folder and renamed only after every
rank finished, then the `latest` pointer moves; a folder whose files do not match meta.json
is incomplete and skipped by --resume auto.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from moco_scale.dist import DistContext
    from moco_scale.engines import Engine

FORMAT = "moco-scale-checkpoint/1"
META = "meta.json"
LATEST = "latest"


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash leaves the old file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def reference_checkpoint(engine: Engine, next_epoch: int, arch: str, model_kwargs: dict[str, Any],
                         step: int) -> dict[str, Any]:
    """{'epoch', 'arch', 'state_dict' (module.* keys), 'optimizer', 'scaler'} as the reference writes,
    plus 'moco_scale' (model kwargs and step) so moco-scale can rebuild a tiny or overridden model.
    Must be called on every rank: a sharded engine gathers the full state."""
    opt = engine.optimizer_state_dict()
    return {
        "epoch": next_epoch,
        "arch": arch,
        "state_dict": {f"module.{k}": v.detach().cpu() for k, v in engine.full_state_dict().items()},
        "optimizer": opt["optimizer"],
        "scaler": opt["scaler"],
        "moco_scale": {"model": model_kwargs, "step": step},
    }


def load_checkpoint(path: str) -> Any:
    """Load a checkpoint file safely (weights_only), with an error that names the file."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder where a checkpoint file was expected")
    expected = "expected a file written by moco-scale or the MoCo v3 reference (torch.save of a dict)"
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
            raise ValueError(f"{path} is not a checkpoint: not a torch.save file (it starts with {head!r}); {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        # torch's own advice (re-run with weights_only=False) would run whatever code the file holds: not given
        raise ValueError(f"{path} is not a checkpoint moco-scale reads: it holds objects other than tensors, numbers "
                         f"and plain containers, and moco-scale loads only those (weights_only); {expected}") from e
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint: torch.load cannot read it ({type(e).__name__}: it is "
                         f"truncated or damaged); {expected}") from e


# -- resumable folders ------------------------------------------------------------------------------
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


def _manifest(folder: Path) -> dict[str, int]:
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


def _step_folders(root: Path) -> list[Path]:
    """Finished folders (renamed from .tmp), newest first."""
    return sorted((p for p in root.glob("step_*") if p.is_dir()), reverse=True)


def find_latest(root: Path, warn: bool = True) -> Path | None:
    """The newest complete checkpoint under `root` (its checkpoints/ folder is looked into too).

    The `latest` pointer is tried first; an incomplete or damaged folder is skipped with a warning."""
    if (root / "checkpoints").is_dir():
        root = root / "checkpoints"
    candidates = _step_folders(root)
    pointer = root / LATEST
    if pointer.is_file() and (root / pointer.read_text().strip()) in candidates:
        first = root / pointer.read_text().strip()
        candidates = [first] + [c for c in candidates if c != first]
    for folder in candidates:
        try:
            verify(folder)
            return folder
        except ValueError as e:
            if warn:
                warnings.warn(f"--resume: skipping {e}", stacklevel=2)
    return None


class CheckpointManager:
    """Writes resumable checkpoint folders under DIR/checkpoints and keeps the newest `keep_last`."""

    def __init__(self, run_dir: str, ctx: DistContext, keep_last: int) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.ctx, self.keep_last = ctx, keep_last

    def save(self, engine: Engine, position: dict[str, Any]) -> Path:
        """A collective. `position` (step, epoch, iter, model, ...) goes into meta.json."""
        name = f"step_{position['step']:08d}"
        final, tmp = self.root / name, self.root / f".{name}.tmp"
        if self.ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        _barrier(self.ctx)
        engine.save(str(tmp))
        torch.save(_rng_state(), tmp / f"rng_rank{self.ctx.rank:05d}.pt")
        _barrier(self.ctx)  # every rank's files are written
        if self.ctx.is_main:
            meta = {"format": FORMAT, **position, "world_size": self.ctx.world_size, "saved_at": time.time(),
                    "files": _manifest(tmp)}
            (tmp / META).write_text(json.dumps(meta, indent=2))
            if final.exists():  # the same step saved twice (an epoch end after --save-every)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write_text(self.root / LATEST, name)
            for old in _step_folders(self.root)[self.keep_last:]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier(self.ctx)
        return final

    def load(self, engine: Engine, folder: Path) -> dict[str, Any]:
        """Restore engine and this rank's RNG from a verified folder; returns its meta.json."""
        meta = verify(folder)
        engine.load(str(folder), meta["world_size"])
        rng = folder / f"rng_rank{self.ctx.rank:05d}.pt"
        if meta["world_size"] == self.ctx.world_size and rng.is_file():
            _set_rng_state(load_checkpoint(str(rng)))
        return meta


def consolidate(folder: Path) -> dict[str, Any]:
    """A resumable checkpoint folder (any engine, any world size) as one reference-format checkpoint,
    read offline in one process. Only DDP's optimizer state fits that format and is kept."""
    meta = verify(folder)
    engine = meta["engine"]
    extra: dict[str, Any] = {}
    if engine == "ddp":
        state = load_checkpoint(str(folder / "engine.pt"))
        model, extra = state["model"], {"optimizer": state["optimizer"], "scaler": state["scaler"]}
    elif engine == "fsdp":
        model = _dcp_model_state(folder)
    else:
        model = _deepspeed_model_state(folder, meta)
    return {"epoch": meta["epoch"], "arch": meta["model"]["arch"],
            "state_dict": {f"module.{k}": v.detach().float() if v.is_floating_point() else v
                           for k, v in model.items()},
            **extra, "moco_scale": {"model": meta["model"], "step": meta["step"]}}


def _dcp_model_state(folder: Path) -> dict[str, torch.Tensor]:
    import tempfile

    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "full.pt")
        dcp_to_torch_save(str(folder), out)
        return torch.load(out, map_location="cpu", weights_only=False)["model"]


def _deepspeed_model_state(folder: Path, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """fp32 masters from DeepSpeed's partitions (zero_to_fp32), the fp32 momentum encoder from momentum.pt."""
    tag = folder / "deepspeed"
    if meta["engine"] == "deepspeed ZeRO-0":
        # no partitions: the module as DeepSpeed saved it (fp32 runs: exact; 16-bit runs: rounded weights)
        model = load_checkpoint(str(tag / "mp_rank_00_model_states.pt"))["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag="deepspeed")
    momentum = load_checkpoint(str(folder / "momentum.pt"))
    for name, tensor in zip(momentum["names"], momentum["tensors"], strict=True):
        model[f"momentum_encoder.{name}"] = tensor
    return dict(model)


def read_any_checkpoint(path: str) -> dict[str, Any]:
    """Any checkpoint as one reference-format dict: a file (moco-scale's or the reference's), a resumable
    folder, or a run folder (its newest complete checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        return load_checkpoint(path)
    if not (folder / META).exists():
        latest = find_latest(folder)
        if latest is None:
            raise FileNotFoundError(f"checkpoint folder {path} holds no complete checkpoint (step_*/{META})")
        folder = latest
    return consolidate(folder)


def make_universal(src: Path, dst: Path) -> str:
    """A DeepSpeed checkpoint folder as a universal one (DeepSpeed's ds_to_universal), loadable at any world
    size within its stage group (ZeRO 1-2, or 3); momentum.pt (fp32 momentum encoder, BN statistics) travels
    beside it. Returns the engine layout it was written by."""
    import subprocess
    import sys

    meta = verify(src)
    if not meta["engine"].startswith("deepspeed") or meta["engine"].endswith("ZeRO-0"):
        raise ValueError(f"{src} was written by {meta['engine']}: universal checkpoints are made from DeepSpeed "
                         "ZeRO 1-3 ones (FSDP checkpoints reshard as they are; DDP's are whole)")
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(src / "deepspeed"), "--output_folder", str(tmp / "universal"),
                          "--inject_missing_state"],  # ZeRO 1-2: the Megatron-only client state it asks for
                         capture_output=True, text=True)
    if res.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise ValueError(f"DeepSpeed's ds_to_universal failed on {src / 'deepspeed'}:\n{res.stderr[-2000:]}")
    shutil.copy2(src / "momentum.pt", tmp / "momentum.pt")
    out = {**{k: v for k, v in meta.items() if k != "files"}, "universal": True, "converted_from": str(src),
           "files": _manifest(tmp)}
    (tmp / META).write_text(json.dumps(out, indent=2))
    if dst.exists():
        raise ValueError(f"{dst} already exists")
    os.replace(tmp, dst)
    return meta["engine"]
