"""One way from a checkpoint to a model, for every command that reads one (pretrain --resume of a file,
convert, lincls, probe): any file moco-scale writes or the reference's, a resumable folder, or a run folder,
read as one reference-format dict and checked key by key and shape by shape against the model it names."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from moco_scale.checkpoint import META, find_latest, position_of, verify
from moco_scale.engines import engine_for_layout
from moco_scale.files import load_checkpoint
from moco_scale.models import ARCHS, MoCo, UnknownArchError, build_moco
from moco_scale.models.vit import VIT_ARCHS


class CheckpointError(ValueError):
    """A checkpoint that is not what the command needs; the message names the file and what is wrong."""


def consolidate(folder: Path) -> dict[str, Any]:
    """A resumable checkpoint folder (any engine, any world size) as one reference-format checkpoint, read
    offline in one process by the engine that wrote it; the optimizer state where it fits the format."""
    meta = verify(folder)
    model, optimizer = engine_for_layout(meta["engine"], folder).read_model_state(folder, meta)
    epoch, _ = position_of(meta)
    out = {"epoch": epoch, "arch": meta["model"]["arch"],
           "state_dict": {f"module.{k}": v.detach().float() if v.is_floating_point() else v for k, v in model.items()},
           "moco_scale": {"model": meta["model"], "step": meta["step"], "iters_per_epoch": meta["iters_per_epoch"]}}
    if optimizer is not None:
        out["optimizer"] = optimizer
    return out


def read_any_checkpoint(path: str) -> dict[str, Any]:
    """Any checkpoint as one reference-format dict: a file (moco-scale's or the reference's), a resumable
    folder, or a run folder (its newest complete checkpoint)."""
    folder = Path(path)
    if not folder.is_dir():
        ckpt = load_checkpoint(path)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
            raise CheckpointError(f"{path} holds no 'state_dict': not a MoCo v3 pretraining checkpoint")
        return ckpt
    if not (folder / META).exists():
        latest = find_latest(folder)
        if latest is None:
            raise FileNotFoundError(f"checkpoint folder {path} holds no complete checkpoint (step_*/{META})")
        folder = latest
    return consolidate(folder)


def model_settings(ckpt: dict[str, Any], path: str) -> dict[str, Any]:
    """build_moco's arguments for a checkpoint: moco-scale's record, else the reference's 'arch'
    with the published heads (256 / 4096) and the sizes read from the tensors."""
    if "moco_scale" in ckpt:
        return dict(ckpt["moco_scale"]["model"])
    arch = ckpt.get("arch")
    if arch not in ARCHS:
        raise CheckpointError(f"{path}: 'arch' is {arch!r}, not one of {', '.join(ARCHS)}")
    sd = ckpt["state_dict"]
    out_dim = sd["module.predictor.3.weight"].shape[0] if "module.predictor.3.weight" in sd else 256
    hidden = sd["module.predictor.0.weight"].shape[0] if "module.predictor.0.weight" in sd else 4096
    settings = {"arch": arch, "moco_dim": out_dim, "moco_mlp_dim": hidden}
    proj, pos = sd.get("module.base_encoder.patch_embed.proj.weight"), sd.get("module.base_encoder.pos_embed")
    if arch in VIT_ARCHS and not VIT_ARCHS[arch].conv_stem and proj is not None and pos is not None:
        # resolution is a user's choice; width, depth and heads are the architecture's
        settings["patch_size"] = proj.shape[-1]
        settings["img_size"] = math.isqrt(pos.shape[1] - 1) * proj.shape[-1]
    return settings


def describe_mismatch(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> str:
    """Missing, unexpected and wrong-shape keys of `got` against `want`; empty when they match."""
    missing, unexpected = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    shapes = sorted(k for k in set(want) & set(got) if want[k].shape != got[k].shape)
    return "; ".join(f"{name}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
                     for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", shapes))
                     if keys)


def checked_state_dict(ckpt: dict[str, Any], path: str, model: MoCo | None = None,
                       hint: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict without 'module.' and the model settings, verified against `model` (default: the model
    the checkpoint names), so that a checkpoint of another model is refused with the keys at fault."""
    settings = model_settings(ckpt, path)
    if model is None:
        try:
            model = build_moco(**settings)
        except (UnknownArchError, TypeError, ValueError) as e:
            raise CheckpointError(f"{path}: cannot rebuild its model ({e})") from e
    got = {k.removeprefix("module."): v for k, v in ckpt["state_dict"].items()}
    mismatch = describe_mismatch(model.state_dict(), got)
    if mismatch:
        raise CheckpointError(f"{path} does not match {settings['arch']} ({mismatch}){hint}")
    return got, settings


def load_pretrained(path: str) -> tuple[MoCo, dict[str, Any], dict[str, Any]]:
    """The MoCo model of any checkpoint with its weights loaded, its settings and the checkpoint itself."""
    ckpt = read_any_checkpoint(path)
    state, settings = checked_state_dict(ckpt, path)
    model = build_moco(**settings)
    model.load_state_dict(state)
    return model, settings, ckpt
