"""The reference trainer's single-file format, both ways: reading any checkpoint moco-scale writes (a file, a
resumable folder of any engine, a run folder) or the reference's as one reference-format dict checked key by
key against the model it names; the optimizer state re-keyed between names (DCP) and positions (the
reference); and writing DIR/checkpoint.pth.tar, the pretraining run's export."""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from moco_scale.checkpoint.io import atomic_save, load_checkpoint
from moco_scale.checkpoint.manager import META, find_latest, verify
from moco_scale.models import ARCHS, MoCo, UnknownArchError, build_moco
from moco_scale.models.resnet import RESNET_ARCHS
from moco_scale.models.vit import VIT_ARCHS

if TYPE_CHECKING:
    from moco_scale.engines.base import Engine


class CheckpointError(ValueError):
    """A checkpoint that is not what the command needs; the message names the file and what is wrong."""


# -- optimizer state: names (DCP) and positions (the reference) ---------------------------------------
def to_reference_optimizer(state: dict[str, Any]) -> dict[str, Any]:
    """A name-keyed optimizer state (DCP's) in torch's own layout, keyed by position, as the reference saves."""
    names = [n for group in state["param_groups"] for n in group["params"]]
    index = {n: i for i, n in enumerate(names)}
    return {"state": {index[n]: v for n, v in state["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in state["param_groups"]]}


def from_reference_optimizer(state: Any, names: list[str]) -> dict[str, Any] | str:
    """The reference's position-keyed optimizer state named by the parameters `names` (the optimizer's order),
    or why it does not fit."""
    if not isinstance(state, dict) or "param_groups" not in state or "state" not in state:
        return "it holds none" if not state else "its 'optimizer' is not a torch optimizer state"
    given = [i for g in state["param_groups"] for i in g["params"]]
    if len(given) != len(names):
        return f"it covers {len(given)} parameters, this model trains {len(names)}"
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


# -- writing ------------------------------------------------------------------------------------------
def write_reference_file(engine: Engine, path: str, arch: str, step: int, iters_per_epoch: int,
                         settings: dict[str, Any]) -> None:
    """DIR/checkpoint.pth.tar as the reference writes it, plus moco-scale's record of the exact step; rank 0
    holds the only (CPU) copy of the whole model. A collective."""
    state = engine.reference_state()
    if state is not None:
        atomic_save({"epoch": step // iters_per_epoch, "arch": arch,
                     "state_dict": {f"module.{k}": v for k, v in state["state_dict"].items()},
                     "optimizer": state["optimizer"], "scaler": state["scaler"],
                     "moco_scale": {"model": settings, "step": step, "iters_per_epoch": iters_per_epoch}}, path)


def reference_start(ckpt: dict[str, Any], iters: int) -> int:
    """The step a reference-format file continues at: moco-scale's own record where it was written with this
    epoch length (a run stopped mid-epoch), else the start of its 'epoch' (the next epoch, as the reference)."""
    own = ckpt.get("moco_scale") or {}
    if isinstance(own.get("step"), int) and own.get("iters_per_epoch") == iters:
        return own["step"]
    return int(ckpt.get("epoch", 0)) * iters


# -- reading ------------------------------------------------------------------------------------------
def consolidate(folder: Path) -> dict[str, Any]:
    """A resumable checkpoint folder (any engine, any world size) as one reference-format checkpoint, read
    offline in one process by the engine that wrote it; the optimizer state where it fits the format."""
    from moco_scale.engines import read_model_state  # engines read their own folders (and import this module)

    meta = verify(folder)
    model, optimizer = read_model_state(folder, meta)
    out = {"epoch": meta["step"] // meta["iters_per_epoch"], "arch": meta["model"]["arch"],
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
            model = build_moco(**settings, seed=0, device="meta")  # shapes and names only
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
    model = build_moco(**settings, seed=0, device="meta")
    model.load_state_dict(state, assign=True)
    return model, settings, ckpt


def checkpoint_identity(path: str) -> dict[str, Any]:
    """What identifies a checkpoint across runs (an evaluation must not resume over another model's): a file's
    path and content hash; a folder's complete checkpoint, its step and when it was saved."""
    import hashlib

    p = Path(path).resolve()
    if p.is_file():
        digest = hashlib.sha256()
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                digest.update(block)
        return {"path": str(p), "sha256": digest.hexdigest()}
    folder = p if (p / META).exists() else find_latest(p)
    if folder is None:
        raise FileNotFoundError(f"checkpoint folder {path} holds no complete checkpoint (step_*/{META})")
    meta = verify(folder)
    return {"path": str(folder), "step": meta["step"], "saved_at": meta["saved_at"]}


def backbone_state(path: str, arch: str | None = None,
                   ckpt: dict[str, Any] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The pretrained base backbone of any checkpoint (without the projector: timm's/torchvision's key names)
    and its model settings (`ckpt`: the file's contents, already read); another architecture than `arch` is
    refused."""
    ckpt = read_any_checkpoint(path) if ckpt is None else ckpt
    state, settings = checked_state_dict(ckpt, path)
    if arch is not None and arch != settings["arch"]:
        raise CheckpointError(f"--pretrained {path} holds {settings['arch']}, not -a {arch}")
    return backbone_of(state, settings["arch"]), settings


def backbone_of(state: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    """The base encoder without its projector (ViT `head.*`, ResNet `fc.*`), keys as timm/torchvision name them."""
    head = "head." if arch in VIT_ARCHS else "fc."
    return {k.removeprefix("base_encoder."): v for k, v in state.items()
            if k.startswith("base_encoder.") and not k.startswith(f"base_encoder.{head}")}


def pretrained_encoder(path: str, arch: str | None = None) -> tuple[torch.nn.Module, int, dict[str, torch.Tensor],
                                                                    dict[str, Any]]:
    """The base encoder of any checkpoint without its projector, on the meta device (a model to place by an
    engine, or to load with `load_state_dict(state, assign=True)`), its feature width, its tensors and settings."""
    from torch import nn

    from moco_scale.models.parts import head_name, projector

    state, settings = backbone_state(path, arch)
    encoder = build_moco(**settings, seed=0, device="meta").base_encoder
    dim = projector(encoder)[0].in_features
    setattr(encoder, head_name(encoder), nn.Identity())
    return encoder, dim, state, settings


# -- a backbone for fine-tuning: any checkpoint, exports included ---------------------------------------
def _export_settings(weights: dict[str, torch.Tensor], path: str, arch: str | None) -> dict[str, Any]:
    """A DeiT/timm/torchvision export's model settings, read from its tensors; the heads, which no tensor shows,
    are MoCo v3's for the architecture (`-a`, or the one whose width and depth the tensors have)."""
    if "cls_token" in weights:
        dim = weights["cls_token"].shape[-1]
        depth = 1 + max(int(k.split(".")[1]) for k in weights if k.startswith("blocks."))
        conv = "patch_embed.proj.0.weight" in weights
        if arch is None:
            found = [a for a, s in VIT_ARCHS.items() if (s.embed_dim, s.depth, s.conv_stem) == (dim, depth, conv)]
            if not found:
                raise CheckpointError(f"{path}: a ViT of width {dim} and depth {depth} is none of moco-scale's "
                                      f"architectures; name it with -a (and its --num-heads)")
            arch = found[0]
        if arch not in VIT_ARCHS:
            raise CheckpointError(f"{path} holds a ViT, not -a {arch}")
        settings: dict[str, Any] = {"arch": arch, "embed_dim": dim, "depth": depth}
        if not conv:
            settings["patch_size"] = weights["patch_embed.proj.weight"].shape[-1]
            settings["img_size"] = math.isqrt(weights["pos_embed"].shape[1] - 1) * settings["patch_size"]
        return settings
    if "layer4.0.conv1.weight" not in weights:
        raise CheckpointError(f"{path} holds neither a MoCo v3 checkpoint ('state_dict') nor a ViT or ResNet backbone")
    guess = "resnet50" if "layer1.0.conv3.weight" in weights else None
    arch = arch or guess
    if arch not in RESNET_ARCHS:
        raise CheckpointError(f"{path} holds a ResNet backbone: name its architecture with -a")
    return {"arch": arch}


def pretrained_backbone(path: str, arch: str | None = None,
                        num_heads: int | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The backbone tensors (timm/torchvision names, no head) and model settings of any checkpoint moco-scale
    writes or reads (a run or step folder, a reference-format file) or of a DeiT/timm/torchvision export. A
    `num_heads` other than the checkpoint's recorded count is refused: qkv has one shape for any head count, so
    such a model would load the weights and compute something else."""
    from moco_scale.models.classifier import SHAPE_KEYS

    p = Path(path)
    ckpt = None if p.is_dir() else load_checkpoint(path)
    if ckpt is None or (isinstance(ckpt, dict) and isinstance(ckpt.get("state_dict"), dict)):
        state, settings = backbone_state(path, arch, ckpt)
        recorded = settings.get("num_heads") or VIT_ARCHS.get(settings["arch"], VIT_ARCHS["vit_small"]).num_heads
        if num_heads is not None and settings["arch"] in VIT_ARCHS and num_heads != recorded:
            raise CheckpointError(f"--num-heads {num_heads}: {path} was trained with {recorded} heads; qkv has the "
                                  f"same shape for any head count, so a {num_heads}-head model would load it and "
                                  "compute other features")
        return state, {k: v for k, v in settings.items() if k in SHAPE_KEYS}
    weights = ckpt.get("model", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(weights, dict) or not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path} holds neither 'state_dict' (MoCo v3), 'model' (DeiT) nor a tensor dict "
                              "(timm, torchvision)")
    weights = {k: v for k, v in weights.items() if not k.startswith(("head.", "fc.", "head_dist."))}
    settings = _export_settings(weights, path, arch)
    if settings["arch"] in VIT_ARCHS:
        settings["num_heads"] = num_heads or VIT_ARCHS[settings["arch"]].num_heads
    return weights, settings
