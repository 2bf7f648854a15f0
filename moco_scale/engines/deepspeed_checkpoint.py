"""DeepSpeed checkpoint folders read offline (convert, lincls, probe) and made universal (resume at another
world size), beside dcp.py: the engines' checkpoint readers, keyed by the layout in meta.json."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from moco_scale.checkpoint.io import load_checkpoint

DS_TAG = "deepspeed"  # the subfolder DeepSpeed writes its checkpoint into
UNIVERSAL_TAG = "universal"  # where `moco-scale convert --to universal` puts ds_to_universal's output
MOMENTUM_FILE = "momentum.pt"  # the fp32 momentum encoder and BN statistics, which DeepSpeed keeps no copy of


def reads(layout: str) -> bool:
    return layout.startswith("deepspeed ZeRO-")


def read_model_state(folder: Path, meta: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict | None]:
    """fp32 masters from DeepSpeed's partitions (zero_to_fp32), the fp32 momentum encoder from momentum.pt;
    no optimizer state (DeepSpeed's is partitioned)."""
    tag = folder / DS_TAG
    if meta["engine"].endswith("ZeRO-0"):
        # no partitions: the module as DeepSpeed saved it (fp32 runs: exact; 16-bit runs: rounded weights)
        model = load_checkpoint(str(tag / "mp_rank_00_model_states.pt"))["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        model = get_fp32_state_dict_from_zero_checkpoint(str(folder), tag=DS_TAG)
    momentum = load_checkpoint(str(folder / MOMENTUM_FILE))
    for name, tensor in zip(momentum["names"], momentum["tensors"], strict=True):
        model[f"momentum_encoder.{name}"] = tensor
    return dict(model), None


def write_universal(src: Path, out: Path, meta: dict[str, Any]) -> str:
    """DeepSpeed's ds_to_universal of `src` into the new folder `out`, momentum.pt (fp32 momentum encoder, BN
    statistics) beside it: loadable at any world size within its stage group (ZeRO 1-2, or 3)."""
    if meta["engine"].endswith("ZeRO-0"):
        raise ValueError(f"{src} was written by {meta['engine']}, which has no partitions to make universal: it "
                         "resumes at any world size as it is")
    res = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                          str(src / DS_TAG), "--output_folder", str(out / UNIVERSAL_TAG),
                          "--inject_missing_state"],  # ZeRO 1-2: the Megatron-only client state it asks for
                         capture_output=True, text=True)
    if res.returncode != 0:
        raise ValueError(f"DeepSpeed's ds_to_universal failed on {src / DS_TAG}:\n{res.stderr[-2000:]}")
    shutil.copy2(src / MOMENTUM_FILE, out / MOMENTUM_FILE)
    # measured with deepspeed 0.19.8: a universal checkpoint's model files are named per stage group
    return "ZeRO-3" if meta["engine"].endswith("ZeRO-3") else "ZeRO-1 or ZeRO-2"
