"""`moco-scale plan`: per-GPU memory and communication of a setup, before paying for it.

Model state (parameters, gradients, optimizer state, momentum encoder) follows each engine's
layout exactly, from the model's parameter shapes: replicated (DDP, ZeRO-0), dim-0 row shards
(FSDP2), flat partitions padded to 2 x world (ZeRO-1/2), per-parameter ceil(n / world) slices
(ZeRO-3). A test holds these figures equal to the tensors the engines allocate. Activations are
the bytes autograd saves for one crop, counted on CPU from a real forward (saved-tensor hooks,
each storage once) and scaled by the crops a rank holds at a time; 16-bit halves them. They are
an estimate: allocator fragmentation and kernels' workspace are not in it.
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from moco_scale.config import ConfigError
from moco_scale.engines import gpu_precision, load_engine_config
from moco_scale.engines.memory import Shapes, model_shapes, ring
from moco_scale.flags import fraction, nonnegative_int, positive_float, positive_int
from moco_scale.models import ARCHS, backbone_blocks, backbone_features, build_moco, projector
from moco_scale.models.vit import VIT_ARCHS

GIB = 2**30
REPO = Path(__file__).resolve().parents[2]


@dataclass
class ActivationProfile:
    """Bytes autograd saves for ONE crop (fp32), by part of the model."""

    blocks: list[int]  # inside each backbone block
    block_inputs: list[int]  # each block's input (what activation checkpointing keeps)
    backbone_rest: int  # patch embedding / stem, final norm, pooling
    heads: int  # projector and predictor
    features: int = 0  # the backbone feature of one crop


def activation_profile(model_kwargs: dict[str, Any]) -> ActivationProfile:
    """Count saved tensors of a real fp32 forward of two crops on CPU, each storage once, parameters excluded.
    (Two crops: BatchNorm in training mode needs more than one value per channel.)"""
    torch.manual_seed(0)
    model = build_moco(**model_kwargs)
    encoder = model.base_encoder
    blocks = backbone_blocks(encoder)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    region = ["rest"]
    totals: dict[str, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen.add(ptr)
            totals[region[0]] = totals.get(region[0], 0) + t.untyped_storage().nbytes()
        return t

    inputs: list[int] = []
    hooks = []
    for i, block in enumerate(blocks):
        def enter(_m, args, i=i):
            region[0] = f"block{i}"
            inputs.append(args[0].nbytes)

        def leave(_m, _args, _out):
            region[0] = "rest"
        hooks += [block.register_forward_pre_hook(enter), block.register_forward_hook(leave)]
    size = model_kwargs.get("img_size", 224)
    x = torch.randn(2, 3, size, size)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        features = backbone_features(encoder, x)
        region[0] = "heads"
        model.predictor(projector(encoder)(features))
    for h in hooks:
        h.remove()
    return ActivationProfile(blocks=[totals.get(f"block{i}", 0) // 2 for i in range(len(blocks))],
                             block_inputs=[n // 2 for n in inputs], backbone_rest=totals.get("rest", 0) // 2,
                             heads=totals.get("heads", 0) // 2, features=features[0].nbytes)


def activation_bytes(profile: ActivationProfile, crops: int, ac_every: int = 0, chunk: int = 0,
                     precision: str = "fp32") -> int:
    """Saved activations on a rank holding `crops` crops (2 per image), with activation checkpointing every
    `ac_every`-th block and the backbone run in chunks of `chunk` crops (0: off)."""
    scale = 0.5 if precision in ("bf16", "fp16") else 1.0
    at_once = min(chunk, crops) if chunk else crops
    kept = [(not ac_every or (i + 1) % ac_every) for i in range(len(profile.blocks))]
    per_crop = profile.backbone_rest + sum(b if keep else x for b, x, keep in
                                           zip(profile.blocks, profile.block_inputs, kept, strict=True))
    recompute = max((b for b, keep in zip(profile.blocks, kept, strict=True) if not keep), default=0)
    backbone = at_once * (per_crop + recompute)
    heads = crops * (profile.heads + (profile.features if chunk else 0))
    return int(scale * (backbone + heads))


@dataclass
class Setup:
    engine_config: str
    world: int
    ac_every: int
    chunk: int


def estimate(model_kwargs: dict[str, Any], shapes: Shapes, profile: ActivationProfile, setup: Setup,
             global_batch: int, precision: str | None = None, optimizer: str = "adamw",
             finetune: bool = False) -> dict[str, Any]:
    """Per-GPU bytes of a setup: the engine's own model of its state, buffers and traffic (its class methods),
    the activations, and the InfoNCE keys every rank gathers. `finetune`: one view per image, `shapes` those of
    the classifier (no momentum encoder, no projector or predictor), no keys."""
    cfg = load_engine_config(setup.engine_config, global_batch, setup.world)
    engine = cfg.engine_class
    prec = gpu_precision(cfg, precision)
    crops = (1 if finetune else 2) * global_batch // setup.world
    if finetune:
        profile = replace(profile, heads=0)  # a Linear head saves only the feature, counted by the backbone
    state = engine.state_bytes(shapes, cfg, setup.world, 0, prec, optimizer)
    chunks = math.ceil(crops / setup.chunk) if setup.chunk else 1
    acts = activation_bytes(profile, crops, setup.ac_every, setup.chunk, prec)
    acts_plain = activation_bytes(profile, crops, 0, 0, prec)
    acts_ac = activation_bytes(profile, crops, 1, setup.chunk, prec)
    extra = engine.buffer_bytes(shapes, cfg, prec, setup.chunk)
    total = sum(state.values()) + acts + extra
    keys = 0 if finetune else 2 * ring(setup.world) * global_batch * model_kwargs.get("moco_dim", 256) * 4
    comm = 0 if setup.world == 1 else int(engine.comm_bytes(shapes, cfg, setup.world, prec, chunks) + keys)
    return {"setup": setup, "engine": cfg.label, "precision": prec, "crops_per_rank": crops, **state,
            "activations": acts, "activations_no_ac": acts_plain, "activations_ac": acts_ac, "buffers": extra,
            "total": total, "comm": comm}


def candidate_setups(world: int, given: Setup) -> list[Setup]:
    """Cheaper-to-run first: no recomputation, then one recomputed forward (checkpointing or chunks), then both;
    engines from the least sharded."""
    configs = [str(REPO / "ds_configs" / f) for f in ("ddp.json", "zero1.json", "zero2.json", "fsdp.json",
                                                       "zero3.json")]
    out = []
    for ac, chunk in ((0, 0), (1, 0), (0, 256), (0, 128), (0, 64), (0, 32), (1, 256), (1, 128), (1, 64), (1, 32)):
        out += [Setup(c, world, ac, chunk) for c in configs]
    return [given, *out]


def _gib(n: float) -> str:
    return f"{n / GIB:.3f}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-a", "--arch", default="vit_base", choices=ARCHS)
    p.add_argument("-b", "--batch-size", type=positive_int, default=4096, help="global batch (images)")
    p.add_argument("--nodes", type=positive_int, default=1)
    p.add_argument("--gpus-per-node", type=positive_int, default=8)
    p.add_argument("--engine-config", default=str(REPO / "ds_configs" / "zero3.json"))
    p.add_argument("--activation-checkpointing", type=nonnegative_int, default=None, metavar="N",
                   help="every N-th block (default: the engine JSON's)")
    p.add_argument("--backbone-chunk", type=nonnegative_int, default=None, metavar="K",
                   help="(default: the engine JSON's)")
    p.add_argument("--gpu-memory", type=positive_float, default=80.0, help="GiB per GPU")
    p.add_argument("--headroom", type=fraction, default=0.1,
                   help="share of the GPU memory kept free for the CUDA context, kernels' workspace and allocator "
                   "fragmentation, which the estimate leaves out (default 0.1)")
    p.add_argument("--precision", default=None, choices=("auto", "fp32", "bf16", "fp16"),
                   help="(default: what the engine JSON gives on a bf16 GPU)")
    p.add_argument("--optimizer", default=None, choices=("adamw", "lars"), help="(default: lars for ResNet)")
    p.add_argument("--image-size", type=positive_int, default=224)
    p.add_argument("--finetune", action="store_true",
                   help="plan `moco-scale finetune` instead: one view per image, the classifier's state (no momentum "
                   "encoder, projector or predictor)")
    p.add_argument("--classes", type=positive_int, default=1000, help="--finetune's classifier width")
    p.add_argument("--moco-dim", type=positive_int, default=256)
    p.add_argument("--moco-mlp-dim", type=positive_int, default=4096)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world = args.nodes * args.gpus_per_node
    try:
        if args.batch_size <= 0 or args.batch_size % world:
            raise ConfigError(f"global batch -b {args.batch_size} must be a positive multiple of the GPU count "
                              f"{world} (--nodes {args.nodes} x --gpus-per-node {args.gpus_per_node})")
        cfg = load_engine_config(args.engine_config, args.batch_size, world)
    except ConfigError as e:
        print(f"moco-scale plan: error: {e}", file=sys.stderr)
        return 2
    optimizer = args.optimizer or ("adamw" if args.arch.startswith("vit") else "lars")
    kwargs = {"arch": args.arch, "img_size": args.image_size, "moco_dim": args.moco_dim,
              "moco_mlp_dim": args.moco_mlp_dim}
    shapes = model_shapes(_classifier(kwargs, args.classes) if args.finetune else
                          build_moco(**kwargs, seed=0, device="meta"))
    profile = activation_profile(kwargs)
    ac = cfg.activation_checkpointing if args.activation_checkpointing is None else args.activation_checkpointing
    chunk = cfg.backbone_chunk if args.backbone_chunk is None else args.backbone_chunk
    given = Setup(args.engine_config, world, ac, chunk)
    try:
        setup_check(args, given, optimizer)
    except ConfigError as err:
        print(f"moco-scale plan: error: this setup would not launch: {err}", file=sys.stderr)
        return 2
    e = estimate(kwargs, shapes, profile, given, args.batch_size, args.precision, optimizer, args.finetune)
    budget = (1 - args.headroom) * args.gpu_memory * GIB
    print_estimate(args, e, world, optimizer, ac, chunk, budget)
    smallest_fit(args, kwargs, shapes, profile, world, optimizer, ac, chunk, budget)
    return 0


def setup_check(args: argparse.Namespace, setup: Setup, optimizer: str) -> None:
    """pretrain's own check of a setup (EngineConfig.check), on a bf16 GPU unless --precision says otherwise;
    fine-tuning runs without chunking."""
    if args.finetune and setup.chunk:
        raise ConfigError("--backbone-chunk is for pretraining (a loss over the whole per-rank batch)")
    cfg = load_engine_config(setup.engine_config, args.batch_size, setup.world).replace(backbone_chunk=setup.chunk)
    plain_vit = args.arch in VIT_ARCHS and not VIT_ARCHS[args.arch].conv_stem
    cfg.check(plain_vit, optimizer, gpu_precision(cfg, args.precision))


def launches(args: argparse.Namespace, setup: Setup, optimizer: str) -> bool:
    try:
        setup_check(args, setup, optimizer)
    except ConfigError:
        return False
    return True


def _classifier(kwargs: dict[str, Any], classes: int) -> torch.nn.Module:
    """The fine-tuning model of `kwargs`' architecture on the meta device (shapes only)."""
    from moco_scale.models.classifier import build_classifier

    return build_classifier({k: v for k, v in kwargs.items() if k in ("arch", "img_size")}, classes, 0.0,
                            torch.nn.CrossEntropyLoss(), seed=0)


def print_estimate(args: argparse.Namespace, e: dict[str, Any], world: int, optimizer: str, ac: int, chunk: int,
                   budget: float) -> None:
    mode = " --finetune" if args.finetune else ""
    print(f"# moco-scale plan{mode}: {args.arch} {args.image_size}px, global batch {args.batch_size} over {world} GPUs "
          f"({e['crops_per_rank']} crops per GPU), {Path(args.engine_config).name} ({e['engine']}, {e['precision']}), "
          f"{optimizer}, activation checkpointing {ac or 'off'}, backbone chunk {chunk or 'off'}")
    print("| per GPU | GiB |\n|---|---|")
    with_chunk = f", chunk {chunk}" if chunk else ""
    rows = [("parameters", e["parameters"]), ("gradients", e["gradients"]), ("optimizer state", e["optimizer"]),
            ("momentum encoder", e["momentum"]),
            (f"activations (this setup{with_chunk})", e["activations"]),
            ("activations without checkpointing, unchunked", e["activations_no_ac"]),
            (f"activations with checkpointing every block{with_chunk}", e["activations_ac"]),
            ("engine buffers (buckets / gathered backbone)", e["buffers"])]
    for name, value in rows:
        print(f"| {name} | {_gib(value)} |")
    verdict = "fits" if e["total"] <= budget else "does NOT fit"
    print(f"| **total** | **{_gib(e['total'])}** of {args.gpu_memory:g} ({verdict}, keeping "
          f"{100 * args.headroom:.0f}% free) |")
    print(f"| sent per GPU per step | {_gib(e['comm'])} |")


def smallest_fit(args: argparse.Namespace, kwargs: dict[str, Any], shapes: Shapes, profile: ActivationProfile,
                 world: int, optimizer: str, ac: int, chunk: int, budget: float) -> None:
    """The first setup that fits, searching 1, 2, 4, ... GPUs, least recomputation first."""
    for w in sorted({2**k for k in range(0, 11) if 2**k <= world} | {world}):
        if args.batch_size % w:
            continue
        fits = [x for x in (estimate(kwargs, shapes, profile, s, args.batch_size, args.precision, optimizer,
                                     args.finetune)
                            for s in candidate_setups(w, Setup(args.engine_config, w, ac, chunk))
                            if launches(args, s, optimizer))
                if x["total"] <= budget]
        if fits:
            s = fits[0]["setup"]
            print(f"smallest setup that fits: {w} GPU(s) with {Path(s.engine_config).name}, activation "
                  f"checkpointing {s.ac_every or 'off'}, backbone chunk {s.chunk or 'off'}: "
                  f"{_gib(fits[0]['total'])} GiB per GPU, {_gib(fits[0]['comm'])} GiB sent per step")
            break
    else:
        print(f"nothing fits in {args.gpu_memory:g} GiB up to {world} GPUs: add GPUs or lower -b")


if __name__ == "__main__":
    sys.exit(main())
