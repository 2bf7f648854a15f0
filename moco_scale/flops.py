"""Model FLOPs of a MoCo v3 training step, counted by torch's FlopCounterMode on a meta-device model.

Counted from the model's shapes (no memory, no data): MFU in the run output and the planner's
activation estimate both start here. Recomputation (activation checkpointing, backbone
chunking) is not counted: MFU counts the FLOPs the algorithm needs, not the ones a memory
trade adds.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from moco_scale.models import MoCo, backbone_features, build_moco, projector

#: dense peak TFLOP/s per GPU by (name fragment, precision); fp32 means TF32 tensor cores (torch's default
#: for convolutions; matmuls use it when allowed). Sources: NVIDIA data sheets, SXM parts.
PEAK_TFLOPS = {
    ("H200", "bf16"): 989.0, ("H200", "fp16"): 989.0, ("H200", "fp32"): 494.0,
    ("H100", "bf16"): 989.0, ("H100", "fp16"): 989.0, ("H100", "fp32"): 494.0,
    ("A100", "bf16"): 312.0, ("A100", "fp16"): 312.0, ("A100", "fp32"): 156.0,
    ("V100", "fp16"): 125.0, ("V100", "fp32"): 15.7,
}


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak for `precision`, where this table knows the device (None on CPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for (part, prec), v in PEAK_TFLOPS.items() if part in name and prec == precision), None)


def _forward_flops(fn, *args: Any) -> int:
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


def step_flops_per_image(model_kwargs: dict[str, Any]) -> dict[str, float]:
    """FLOPs per image (two crops) of one training step, split by part.

    backbone: base-encoder backbone forward of one crop; heads: projector + predictor forward of one
    crop; train: 2 crops x (3 x (backbone + heads) for the base's forward and backward + backbone +
    projector forward of the momentum encoder). The InfoNCE logits (batch x batch) are left out.
    """
    with torch.device("meta"):
        # eval: BN needs no sync and no batch > 1 on meta
        model: MoCo = build_moco(**model_kwargs, seed=0, device="meta").eval()
        x = torch.empty(2, 3, model_kwargs.get("img_size", 224), model_kwargs.get("img_size", 224))
        with torch.no_grad():
            backbone = _forward_flops(backbone_features, model.base_encoder, x) / 2
            f = backbone_features(model.base_encoder, x)
            head = projector(model.base_encoder)
            proj = _forward_flops(head, f) / 2
            pred = _forward_flops(model.predictor, head(f)) / 2
    train = 2 * (3 * (backbone + proj + pred) + backbone + proj)
    return {"backbone": backbone, "projector": proj, "predictor": pred, "train": train}
