"""Checkpoint conversions: the reference layout, DeiT, timm and torchvision backbones.

    moco-scale convert --to reference|deit|timm|torchvision INPUT OUTPUT

INPUT is a checkpoint moco-scale writes (a resumable folder DIR/checkpoints/step_N of any engine,
or DIR/checkpoint.pth.tar) or a reference-format file ({'epoch', 'arch',
'state_dict' with module.base_encoder.* / module.momentum_encoder.* / module.predictor.* keys},
the published pretrained files included). Every input is first checked against the model its
'arch' (and moco-scale's size settings, when present) describes, so a file from another
architecture is refused with the mismatched keys listed, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from moco_scale.checkpoint.io import atomic_save
from moco_scale.checkpoint.manager import manifest, verify
from moco_scale.checkpoint.reference import CheckpointError, backbone_of, checked_state_dict, read_any_checkpoint
from moco_scale.engines import write_universal
from moco_scale.models.resnet import RESNET_ARCHS
from moco_scale.models.vit import VIT_ARCHS
from moco_scale.paths import writable_file_problem, writable_folder_problem

FORMATS = ("reference", "deit", "timm", "torchvision", "universal")


class ConvertError(CheckpointError):
    pass


def make_universal(src: Path, dst: Path) -> tuple[str, str]:
    """A checkpoint folder in its engine's universal form (DeepSpeed's), written as a hidden folder and renamed;
    meta.json travels with it. Returns the layout it was written by and the engines that resume it."""
    meta = verify(src)
    tmp = dst.with_name(f".{dst.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        stages = write_universal(src, tmp, meta)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    out = {**{k: v for k, v in meta.items() if k != "files"}, "universal": True, "converted_from": str(src),
           "files": manifest(tmp)}
    (tmp / "meta.json").write_text(json.dumps(out, indent=2))
    if dst.exists():
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConvertError(f"{dst} already exists")
    os.replace(tmp, dst)
    return meta["engine"], stages


def check_output(src: str, dst: str, to: str, force: bool) -> None:
    """Nothing already saved is lost: the input is never the output, and an existing file is replaced only with
    --force (a universal checkpoint, a folder, never replaces anything)."""
    s, d = Path(src).resolve(), Path(dst).resolve()
    if d == s:
        raise ConvertError(f"the output {dst} is the input; write the {to} checkpoint to another path")
    if to == "universal":
        if d.exists():
            raise ConvertError(f"the output {dst} already exists; a universal checkpoint goes to a new folder")
        if why := writable_folder_problem(dst):
            raise ConvertError(f"the output {dst} {why}")
        return
    if d.is_dir():
        raise ConvertError(f"the output {dst} is a folder; name the file to write, e.g. {Path(dst) / f'{to}.pth'}")
    if why := writable_file_problem(dst):
        raise ConvertError(f"the output {dst} {why}")
    if d.exists() and not force:
        raise ConvertError(f"the output {dst} already exists; pass --force to replace it")


def convert(src: str, dst: str, to: str, force: bool = False) -> str:
    """Write `dst` in format `to`; returns a line to print about what the user must know."""
    if to not in FORMATS:
        raise ConvertError(f"--to must be one of {', '.join(FORMATS)}, not {to!r}")
    check_output(src, dst, to, force)
    if to == "universal":
        engine, stages = make_universal(Path(src), Path(dst))
        return (f"wrote {dst}: a DeepSpeed universal checkpoint of {engine}; --resume {dst} at any world size under "
                f"{stages} (checkpoint.load_universal is set for you; another stage: convert --to reference)")
    ckpt = read_any_checkpoint(src)
    state, settings = checked_state_dict(ckpt, src)
    arch = settings["arch"]
    if to == "reference":
        out = {"epoch": ckpt.get("epoch", 0), "arch": arch,
               "state_dict": {f"module.{k}": v for k, v in state.items()}}
        # the reference's readers ignore 'moco_scale'; it keeps a tiny or resized model rebuildable
        out.update({k: ckpt[k] for k in ("optimizer", "scaler", "moco_scale") if ckpt.get(k) is not None})
        atomic_save(out, dst)
        return f"wrote {dst}: the reference trainer's layout ({len(state)} tensors)"
    if to in ("deit", "timm") and arch not in VIT_ARCHS:
        raise ConvertError(f"--to {to} needs a ViT checkpoint; {src} holds {arch} (use --to torchvision)")
    if to == "torchvision" and arch not in RESNET_ARCHS:
        raise ConvertError(f"--to torchvision needs a ResNet checkpoint; {src} holds {arch} (use --to deit or timm)")
    weights = backbone_of(state, arch)
    atomic_save({"model": weights} if to == "deit" else weights, dst)
    if arch in VIT_ARCHS:
        heads = settings.get("num_heads") or VIT_ARCHS[arch].num_heads
        note = (f"; build the model with num_heads={heads}: qkv has the same shape for any head count, "
                "so a model with another count loads it silently and computes something else")
        if arch == "vit_small":
            note += " (DeiT's and timm's vit_small default to 6 heads; MoCo v3's ViT-S has 12)"
        return f"wrote {dst}: {to} backbone of {arch}, {len(weights)} tensors, no head{note}"
    return f"wrote {dst}: torchvision {arch} backbone, {len(weights)} tensors, without fc (load with strict=False)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="moco-scale convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--to", required=True, choices=FORMATS)
    p.add_argument("input")
    p.add_argument("output")
    p.add_argument("--force", action="store_true", help="replace an existing output file (never the input)")
    args = p.parse_args(argv)
    try:
        print(convert(args.input, args.output, args.to, args.force))
    except (ConvertError, OSError, ValueError) as e:
        print(f"moco-scale convert: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
