#!/usr/bin/env python
"""Benchmark (not a test): moco-scale's fine-tuning step against a plain timm step, same model, batch and threads.

    .venv/bin/python scripts/bench_finetune.py [--arch vit_small] [--batch 16] [--engines ddp fsdp] [--steps 6]
    python3 scripts/bench_finetune.py --device cuda --arch vit_base --batch 128 --engines ddp_bf16 fsdp zero3

- `plain`: timm's VisionTransformer with a head, torch's AdamW over timm's layer-decay groups (each group's lr
  set to lr x its scale), soft-target cross-entropy: the step a plain script writes (on CUDA in bf16 autocast).
- each engine: moco-scale's step (train/finetune.py's model, groups and engine from ds_configs/), world 1.
- `x plain`: on the CPU the plain and the engine steps alternate in one process, so a drifting machine slows both
  alike; the ratio is the median of the step-by-step ratios. img/s and peak memory (CUDA) per row.
Synthetic images and soft targets (Mixup's), MAE's recipe values (layer decay 0.65); medians after a warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time
from functools import partial

import torch
import torch.nn.functional as F
from bench_common import free_port, init_single, peak_gib, sync
from timm.loss import SoftTargetCrossEntropy
from timm.models.vision_transformer import VisionTransformer
from timm.optim import param_groups_layer_decay

from moco_scale.engines import load_engine_config
from moco_scale.models.classifier import build_classifier
from moco_scale.optim import OptimizerSpec
from moco_scale.telemetry import CheckTable

CLASSES, LR, WD, DECAY = 1000, 1e-3, 0.05, 0.65
TINY = dict(arch="vit_tiny", img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4)


def settings_of(arch: str, tiny: bool) -> dict:
    from moco_scale.models.vit import VIT_ARCHS

    if tiny:
        return dict(TINY)
    d, n, h, p, _ = VIT_ARCHS[arch]
    return dict(arch=arch, img_size=224, patch_size=p, embed_dim=d, depth=n, num_heads=h)


class PlainStep:
    """The plain script's step: timm model, torch AdamW over timm's groups, soft-target CE (bf16 autocast on CUDA)."""

    def __init__(self, s: dict, device: torch.device) -> None:
        self.model = VisionTransformer(img_size=s["img_size"], patch_size=s["patch_size"], embed_dim=s["embed_dim"],
                                       depth=s["depth"], num_heads=s["num_heads"], num_classes=CLASSES, qkv_bias=True,
                                       drop_path_rate=0.1, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6)).to(device)
        groups = param_groups_layer_decay(self.model, WD, no_weight_decay_list=self.model.no_weight_decay(),
                                          layer_decay=DECAY)
        self.optimizer = torch.optim.AdamW(groups, lr=LR)
        self.device = device

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        for g in self.optimizer.param_groups:
            g["lr"] = LR * g["lr_scale"]
        with torch.autocast(self.device.type, torch.bfloat16, enabled=self.device.type == "cuda"):
            logits = self.model(x)
        loss = (-y * F.log_softmax(logits.float(), dim=-1)).sum(-1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return loss.detach()


def engine_step(s: dict, config: str, batch: int, ctx):
    model = build_classifier(s, CLASSES, 0.1, SoftTargetCrossEntropy(), seed=0)
    spec = model.group_spec(WD, DECAY)
    cfg = load_engine_config(f"ds_configs/{config}.json", batch, 1)
    engine = cfg.build(model, OptimizerSpec("adamw", WD, groups=lambda m: m.param_groups(spec)), ctx)
    return engine, lambda x, y: engine.train_step((x, y), LR)


def timed(fn, x, y, device) -> float:
    sync(device)
    start = time.perf_counter()
    fn(x, y).item()
    sync(device)
    return time.perf_counter() - start


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="vit_small")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--engines", nargs="+", default=["ddp", "fsdp"])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--tiny", action="store_true", help="the test suite's tiny ViT (scripts/gpu_check.sh --dry-run)")
    args = p.parse_args()
    ctx = init_single(args.device, free_port())
    device = ctx.device
    s = settings_of(args.arch, args.tiny)
    x = torch.randn(args.batch, 3, s["img_size"], s["img_size"], device=device)
    y = torch.distributions.Dirichlet(torch.full((CLASSES,), 0.5)).sample((args.batch,)).to(device)
    table = CheckTable(f"fine-tuning step, {s['arch']} {s['img_size']} px, batch {args.batch}, {device.type}, "
                       f"{torch.get_num_threads()} threads, MAE groups (layer decay {DECAY})",
                       ["step", "ms/step", "img/s", "x plain", "peak GiB"])
    torch.manual_seed(0)
    plain = PlainStep(s, device)
    plain_times: list[float] = []

    def plain_row():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        timed(plain, x, y, device)
        plain_times.extend(timed(plain, x, y, device) for _ in range(args.steps))
        ms = statistics.median(plain_times) * 1e3
        return [f"{ms:.1f}", f"{args.batch / ms * 1e3:.1f}", "1.00", peak_gib(device)]

    table.row(["plain timm + AdamW"], plain_row)
    for config in args.engines:
        def row(config=config):
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            engine, step = engine_step(s, config, args.batch, ctx)
            try:
                timed(step, x, y, device)
                ratios, times = [], []
                for _ in range(args.steps):  # alternate: the machine's drift hits both
                    t_engine, t_plain = timed(step, x, y, device), timed(plain, x, y, device)
                    times.append(t_engine)
                    ratios.append(t_engine / t_plain)
                ms = statistics.median(times) * 1e3
                return [f"{ms:.1f}", f"{args.batch / ms * 1e3:.1f}", f"{statistics.median(ratios):.2f}",
                        peak_gib(device)]
            finally:
                engine.close()
        table.row([f"moco-scale {config} ({engine_precision(config, device)})"], row)
    return 1 if table.failed else 0


def engine_precision(config: str, device: torch.device) -> str:
    from moco_scale.engines.base import gpu_precision, resolve_precision

    cfg = load_engine_config(f"ds_configs/{config}.json")
    return gpu_precision(cfg) if device.type == "cuda" else resolve_precision(cfg.requested_precision, device)


if __name__ == "__main__":
    raise SystemExit(main())
