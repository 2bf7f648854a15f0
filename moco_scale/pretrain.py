"""MoCo v3 pretraining driver; accepts the reference trainer's flags.

One process:  moco-scale pretrain [DATA] -a vit_small ...
torchrun:     torchrun --nproc_per_node N -m moco_scale.pretrain [DATA] ...
DeepSpeed:    deepspeed --num_gpus N --module moco_scale.pretrain [DATA] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from moco_scale import schedules
from moco_scale.checkpoint import CheckpointManager, find_latest, verify
from moco_scale.config import ConfigError
from moco_scale.data import AUGMENT, BUILTIN_IMAGE_SIZE, DataError, DeviceFeed, pretrain_dataset, pretrain_loader
from moco_scale.dist import (
    DistContext,
    StopRequest,
    init_distributed,
    loader_workers,
    mean_across_ranks,
    shutdown,
    world_size_from_env,
)
from moco_scale.engines import build_engine, engine_class, load_engine_config, needs_process_group
from moco_scale.files import NoSpaceError, atomic_save, load_checkpoint
from moco_scale.flags import (
    crop_fraction,
    nonnegative_float,
    nonnegative_int,
    positive_float,
    positive_int,
    unit_interval,
)
from moco_scale.flops import peak_tflops, step_flops_per_image
from moco_scale.loading import checked_state_dict
from moco_scale.models import ARCHS, UnknownArchError, build_moco
from moco_scale.models.vit import VIT_ARCHS
from moco_scale.optim import OPTIMIZERS
from moco_scale.telemetry import RunLogger, Throughput

_IGNORED_REFERENCE_FLAGS = ("--world-size", "--rank", "--dist-url", "--dist-backend", "--gpu")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moco-scale pretrain", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data", nargs="?", default=None,
                   help="ImageFolder root holding train/ (default: the built-in digits dataset)")
    ref = p.add_argument_group("reference trainer flags (same meaning as MoCo v3's main_moco.py)")
    ref.add_argument("-a", "--arch", default="resnet50", help=f"one of: {', '.join(ARCHS)}")
    ref.add_argument("-j", "--workers", type=nonnegative_int, default=32,
                     help="data loading workers per node, shared by its ranks (as in the reference)")
    ref.add_argument("--epochs", type=positive_int, default=100)
    ref.add_argument("-b", "--batch-size", type=positive_int, default=4096, help="global batch over all ranks")
    ref.add_argument("--lr", "--learning-rate", dest="lr", type=positive_float, default=0.6,
                     help="base lr; the lr used is lr * batch / 256")
    ref.add_argument("--wd", "--weight-decay", dest="weight_decay", type=nonnegative_float, default=1e-6)
    ref.add_argument("-p", "--print-freq", type=positive_int, default=10, help="log every N steps")
    ref.add_argument("--seed", type=nonnegative_int, default=0)
    ref.add_argument("--moco-dim", type=positive_int, default=256)
    ref.add_argument("--moco-mlp-dim", type=positive_int, default=4096)
    ref.add_argument("--moco-m", type=unit_interval, default=0.99)
    ref.add_argument("--moco-m-cos", action="store_true", help="cosine momentum schedule from --moco-m to 1")
    ref.add_argument("--moco-t", type=positive_float, default=1.0)
    ref.add_argument("--stop-grad-conv1", action="store_true")
    ref.add_argument("--optimizer", default="lars", choices=OPTIMIZERS)
    ref.add_argument("--warmup-epochs", type=nonnegative_int, default=10)
    ref.add_argument("--crop-min", type=crop_fraction, default=0.08)
    ref.add_argument("--multiprocessing-distributed", action="store_true",
                     help="accepted for compatibility; the launcher decides the processes")
    for flag in _IGNORED_REFERENCE_FLAGS:
        ref.add_argument(flag, default=None, help=argparse.SUPPRESS)
    own = p.add_argument_group("moco-scale")
    own.add_argument("--engine-config", default=None, help="engine JSON in ds_configs/ (default: DDP defaults)")
    own.add_argument("--output-dir", default="runs/pretrain")
    own.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir")
    own.add_argument("--max-steps", type=positive_int, default=None, help="stop after N optimizer steps (schedules "
                     "still span --epochs)")
    own.add_argument("--resume", default=None, metavar="auto|PATH",
                     help="continue a run: 'auto' = the newest complete checkpoint in --output-dir (or a fresh "
                     "start when there is none); PATH = a checkpoint folder, a run folder, or a reference-format "
                     "file (.pth.tar, published pretrained files included)")
    own.add_argument("--save-every", type=nonnegative_int, default=0, metavar="N",
                     help="also save a resumable checkpoint every N steps (always: at each epoch end)")
    own.add_argument("--keep-last", type=positive_int, default=2, metavar="K", help="resumable checkpoints to keep")
    own.add_argument("--reference-every", default="epoch", choices=("epoch", "end", "never"),
                     help="when to write DIR/checkpoint.pth.tar, the reference's single file (rank 0 gathers it on the "
                     "CPU one tensor at a time): at each epoch end as the reference does, at the end only, or never "
                     "(convert --to reference makes it from any checkpoint folder)")
    own.add_argument("--image-size", type=positive_int, default=None,
                     help=f"crop size (default 224; {BUILTIN_IMAGE_SIZE} for the built-in dataset)")
    own.add_argument("--patch-size", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--embed-dim", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--depth", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--num-heads", type=positive_int, default=None, help="ViT size override")
    own.add_argument("--peak-tflops", type=positive_float, default=None, metavar="T",
                     help="the device's peak TFLOP/s per GPU for MFU (default: known for A100/H100/H200/V100)")
    own.add_argument("--backbone-chunk", type=nonnegative_int, default=None, metavar="K",
                     help="run the ViT backbone over chunks of K images with recomputation: memory follows K, "
                     "the gradients do not change (default: the engine JSON's backbone_chunk, 0 = off)")
    own.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    own.add_argument("--dist-timeout", type=positive_float, default=1800.0,
                     help="seconds a collective may wait before the job fails (a dead rank)")
    own.add_argument("--augment", default="cpu", choices=AUGMENT,
                     help="cpu: the reference pipeline (PIL) in the loader workers, uint8 views to the device; device: "
                     "the workers only decode and draw each view's parameters, every random op runs batched on the "
                     "training device (same parameter draws, same distribution; for GPUs the workers cannot feed)")
    own.add_argument("--skip-bad-data", action="store_true",
                     help="skip and count unreadable images and empty class folders instead of failing")
    own.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def model_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    return {"arch": args.arch, "img_size": args.image_size, "patch_size": args.patch_size,
            "embed_dim": args.embed_dim, "depth": args.depth, "num_heads": args.num_heads,
            "stop_grad_conv1": args.stop_grad_conv1, "moco_dim": args.moco_dim,
            "moco_mlp_dim": args.moco_mlp_dim, "moco_t": args.moco_t}


def check_args(args: argparse.Namespace, world: int) -> None:
    """Everything that can be wrong with the launch line, found before any rank talks to another."""
    if args.arch not in ARCHS:
        raise UnknownArchError(f"unknown architecture -a {args.arch}; known: {', '.join(ARCHS)}")
    if args.batch_size <= 0 or args.batch_size % world:
        raise ConfigError(f"global batch -b {args.batch_size} must be a positive multiple of the world size "
                          f"{world} (each rank takes an equal share, as the reference requires)")
    if args.epochs <= args.warmup_epochs and args.epochs > 0:
        raise ConfigError(f"--warmup-epochs {args.warmup_epochs} must be below --epochs {args.epochs}")
    if args.backbone_chunk and (args.arch not in VIT_ARCHS or VIT_ARCHS[args.arch].conv_stem):
        raise ConfigError(f"--backbone-chunk needs a ViT: {args.arch} has BatchNorm in its backbone, whose "
                          "statistics would be computed per chunk and change the result")


def _interrupted(run: Path) -> bool:
    """A run that saved checkpoints but did not finish: killed (no summary.json) or stopped by a signal."""
    if not any((run / "checkpoints").glob("step_*")):
        return False
    try:
        return bool(json.loads((run / "summary.json").read_text()).get("interrupted"))
    except (OSError, ValueError):
        return True


def prepare_output_dir(path: str, overwrite: bool, resuming: bool) -> Path | None:
    """The run folder, made; with --overwrite the old run is moved aside (returned), to be deleted only once this
    run has written its first checkpoint: a run that fails at its first batch loses nothing."""
    aside = None
    if os.path.exists(os.path.join(path, "config.json")) and not resuming:
        if not overwrite and _interrupted(Path(path)):
            raise ConfigError(f"--output-dir {path} holds an interrupted run with checkpoints: continue it with "
                              "--resume auto, or choose another folder (--overwrite would delete its checkpoints)")
        if not overwrite:
            raise ConfigError(f"--output-dir {path} already holds a run (config.json); choose another "
                              "folder or pass --overwrite")
        stem = f"{os.path.abspath(path).rstrip(os.sep)}.overwritten-{time.strftime('%Y%m%d-%H%M%S')}"
        aside = next(Path(f"{stem}{suffix}") for suffix in ("", *(f".{i}" for i in range(1, 1000)))
                     if not os.path.exists(f"{stem}{suffix}"))
        os.replace(path, aside)
    os.makedirs(path, exist_ok=True)
    return aside


def resolved_config(args: argparse.Namespace, engine_cfg: dict, ctx: DistContext, precision: str,
                    iters_per_epoch: int, total_steps: int, workers: int) -> dict[str, Any]:
    return {
        "args": {k: v for k, v in vars(args).items() if k != "local_rank"},
        "engine": engine_cfg,
        "resolved": {
            "world_size": ctx.world_size, "per_rank_batch": args.batch_size // ctx.world_size,
            "lr": schedules.scaled_lr(args.lr, args.batch_size), "iters_per_epoch": iters_per_epoch,
            "total_steps": total_steps, "workers_per_rank": workers, "device": str(ctx.device),
            "precision": precision, "dataset": args.data or "builtin:digits",
        },
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "command": sys.argv,
    }


def find_resume(args: argparse.Namespace, is_main: bool) -> tuple[str, Path, Any] | None:
    """What --resume names: ("folder", path, its meta.json) or ("reference", path, the loaded file)."""
    if args.resume is None:
        return None
    if args.resume == "auto":
        with warnings.catch_warnings():
            warnings.simplefilter("default" if is_main else "ignore")
            folder = find_latest(Path(args.output_dir))
        if folder is None:
            if is_main:
                print(f"moco-scale: --resume auto: no complete checkpoint in {args.output_dir}/checkpoints, "
                      "starting from scratch", file=sys.stderr)
            return None
        return "folder", folder, verify(folder)
    path = Path(args.resume)
    if path.is_file():
        return "reference", path, load_checkpoint(str(path))
    if not path.is_dir():
        raise ConfigError(f"--resume {path} does not exist")
    if not (path / "meta.json").exists():
        with warnings.catch_warnings():
            warnings.simplefilter("default" if is_main else "ignore")
            folder = find_latest(path)
        if folder is None:
            raise ConfigError(f"--resume {path}: no complete checkpoint folder (step_*/meta.json) in it")
        path = folder
    return "folder", path, verify(path)


def check_resumable(meta: dict[str, Any], source: Path, args: argparse.Namespace, engine_cfg: dict[str, Any],
                    dataset_size: int) -> dict[str, Any]:
    """A checkpoint folder continues this run only with the same model, batch, data and an engine that reads its
    layout; returns the engine config that reads it (the engine's answer)."""
    mine = model_kwargs(args)
    diff = [f"{k} {meta['model'].get(k)!r} there, {v!r} here" for k, v in mine.items() if meta["model"].get(k) != v]
    if diff:
        raise ConfigError(f"--resume {source} is from another model: {'; '.join(diff)}")
    if meta["global_batch"] != args.batch_size:
        raise ConfigError(f"--resume {source} was trained with -b {meta['global_batch']}, this run has -b "
                          f"{args.batch_size}: the schedules and data order would not continue")
    if meta["dataset_size"] != dataset_size:
        raise ConfigError(f"--resume {source} saw {meta['dataset_size']} training images, this data has "
                          f"{dataset_size}")
    return engine_class(engine_cfg).resume_config(engine_cfg, meta, source)


def load_reference_weights(model: torch.nn.Module, path: Path, ckpt: Any, arch: str) -> None:
    """A reference-format file (published pretrained files included) into the fresh model, before wrapping."""
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        raise ConfigError(f"--resume {path} holds no 'state_dict': not a MoCo v3 pretraining checkpoint")
    if ckpt.get("arch", arch) != arch:
        raise ConfigError(f"--resume {path} holds {ckpt['arch']}, this run is -a {arch}")
    state, _ = checked_state_dict(ckpt, f"--resume {path}", model, hint="; pass the size flags it was trained with")
    model.load_state_dict(state)


def reference_start(ckpt: dict[str, Any], iters: int) -> int:
    """The step a reference-format file continues at: moco-scale's own record where it was written with this
    epoch length (a run stopped mid-epoch), else the start of its 'epoch' (the next epoch, as the reference)."""
    own = ckpt.get("moco_scale") or {}
    if isinstance(own.get("step"), int) and own.get("iters_per_epoch") == iters:
        return own["step"]
    return int(ckpt.get("epoch", 0)) * iters


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the summary (also written to DIR/summary.json)."""
    world = world_size_from_env()
    check_args(args, world)
    engine_cfg = load_engine_config(args.engine_config, args.batch_size, world)
    if args.backbone_chunk is not None:
        engine_cfg["backbone_chunk"] = args.backbone_chunk
    if args.image_size is None:
        args.image_size = BUILTIN_IMAGE_SIZE if args.data is None else 224
    dataset = pretrain_dataset(args.data, args.image_size, args.crop_min, args.seed, args.skip_bad_data, args.augment)
    if len(dataset) < args.batch_size:
        raise ConfigError(f"global batch -b {args.batch_size} is larger than the dataset "
                          f"({len(dataset)} images in {args.data or 'the built-in dataset'})")

    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = find_resume(args, is_main)  # every file is checked before any rank talks to another
    if resume is not None and resume[0] == "folder":
        engine_cfg = check_resumable(resume[2], resume[1], args, engine_cfg, len(dataset))
    policy = engine_class(engine_cfg)

    ctx = init_distributed(args.device, args.dist_timeout, require_group=needs_process_group(engine_cfg))
    torch.manual_seed(args.seed)
    model = build_moco(**model_kwargs(args))
    if resume is not None and resume[0] == "reference":
        load_reference_weights(model, resume[1], resume[2], args.arch)
    engine = build_engine(model, args.optimizer, args.weight_decay, engine_cfg, ctx)
    workers = loader_workers(args.workers, ctx.local_world_size)
    loader = pretrain_loader(dataset, args.batch_size, ctx.world_size, ctx.rank, args.seed, workers,
                             pin_memory=ctx.device.type == "cuda")
    feed = DeviceFeed(loader, ctx.device, dataset.on_device)
    iters = len(loader)
    total_steps = iters * args.epochs if args.max_steps is None else min(args.max_steps, iters * args.epochs)
    aside = None
    if ctx.is_main:
        # --resume auto may find no checkpoint yet (a crash before the first save): the folder is still this run's
        aside = prepare_output_dir(args.output_dir, args.overwrite, resuming=args.resume is not None)
        config = resolved_config(args, engine_cfg, ctx, engine.precision, iters, total_steps, workers)
        config["resolved"]["resumed_from"] = None if resume is None else str(resume[1])
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
    if ctx.is_distributed:
        torch.distributed.barrier()  # the folder exists before any rank writes into it

    say = (lambda text: print(text, file=sys.stderr)) if ctx.is_main else (lambda text: None)  # noqa: E731
    manager = CheckpointManager(args.output_dir, ctx, args.keep_last, warn=say)
    manager.discard_after_first_save = aside
    if aside is not None:
        say(f"moco-scale: --overwrite: moved the previous run to {aside}; it is deleted once this run has saved "
            "its first checkpoint")
    step = 0
    if resume is not None and resume[0] == "folder":
        step = manager.load(engine, resume[1])["step"]
    if resume is not None and resume[0] == "reference":
        step = reference_start(resume[2], iters)
        why = engine.load_reference_optimizer(resume[2].get("optimizer"), resume[2].get("scaler"))
        if why is not None:
            say(f"moco-scale: warning: --resume {resume[1]}: the optimizer starts fresh ({why}); weights and "
                "position are restored")
    if resume is not None:
        manager.start_timeline(step)  # the later folders of an abandoned timeline go aside
    start_epoch, start_iter = divmod(step, iters)
    logger = RunLogger(args.output_dir, ctx.is_main, total_steps, initial_step=step)

    def position() -> dict[str, Any]:
        """meta.json: the step is the truth; epoch and batch are derived from it and iters_per_epoch."""
        return {"step": step, "iters_per_epoch": iters, "global_batch": args.batch_size,
                "dataset_size": len(dataset), "model": model_kwargs(args), "engine": policy.layout(engine_cfg),
                "precision": engine.precision, "seed": args.seed}

    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth.tar")

    def write_reference() -> None:
        """The reference's single file; rank 0 holds the only (CPU) copy of the whole model."""
        state = engine.reference_state()  # a collective
        if state is not None:
            atomic_save({"epoch": step // iters, "arch": args.arch,
                         "state_dict": {f"module.{k}": v for k, v in state["state_dict"].items()},
                         "optimizer": state["optimizer"], "scaler": state["scaler"],
                         "moco_scale": {"model": model_kwargs(args), "step": step, "iters_per_epoch": iters}},
                        ckpt_path)

    if resume is not None and resume[0] == "reference":
        manager.save(engine, position())  # the imported state, resumable without the file

    base_lr = schedules.scaled_lr(args.lr, args.batch_size)
    logger.message(f"moco-scale: {args.arch}, world {ctx.world_size} on {ctx.device}, global batch "
                   f"{args.batch_size}, {iters} steps/epoch, {total_steps} steps, engine {policy.label(engine_cfg)} "
                   f"({engine.precision}), output {args.output_dir}")
    if resume is not None:
        logger.message(f"resumed from {resume[1]} at step {step} (epoch {start_epoch}, batch {start_iter})")
    flops = step_flops_per_image(model_kwargs(args))["train"]
    peak = args.peak_tflops if args.peak_tflops else peak_tflops(ctx.device, engine.precision)
    meter = Throughput(ctx.world_size, ctx.device, flops, peak, total_steps, step)
    watch = model.first_layer_names()
    last_loss, started = float("nan"), time.time()
    stop, interrupted = StopRequest(ctx), False
    for epoch in range(start_epoch, args.epochs):
        if step >= total_steps:
            break
        loader.batch_sampler.set_epoch(epoch, start_iter if epoch == start_epoch else 0)
        fetch_start = time.perf_counter()
        for i, (x1, x2) in enumerate(feed, start=loader.batch_sampler.start):
            data_wait = time.perf_counter() - fetch_start
            ep = epoch + i / iters
            lr = schedules.learning_rate(ep, base_lr, args.epochs, args.warmup_epochs)
            m = schedules.momentum(ep, args.moco_m, args.epochs, args.moco_m_cos)
            logging = (step + 1) % args.print_freq == 0 or step + 1 == total_steps
            loss = engine.train_step(x1, x2, lr, m, watch=watch if logging else ())
            step += 1
            meter.add(args.batch_size, data_wait)
            logger.advance()
            if logging:
                last_loss = mean_across_ranks(loss).item()
                if not math.isfinite(last_loss):
                    raise FloatingPointError(f"loss is {last_loss} at step {step} (epoch {ep:.3f})")
                norms = {f"grad_norm/{n.removeprefix('base_encoder.')}": v for n, v in engine.last_grad_norms.items()}
                logger.log({"step": step, "epoch": ep, "loss": last_loss, "lr": lr, "moco_m": m, **norms,
                            **meter.read()})
            if step == total_steps:
                break
            if stop.agreed(may_sync=logging):
                saved = manager.save(engine, position())
                logger.message(f"{stop.signal_name or 'a signal on another rank'}: saved {saved} at step {step}; "
                               "exiting (continue with --resume auto)")
                interrupted = True
                break
            if args.save_every and step % args.save_every == 0:
                manager.save(engine, position())
            fetch_start = time.perf_counter()
        if interrupted:
            break
        manager.save(engine, position())
        if args.reference_every == "epoch" or (args.reference_every == "end" and step == total_steps):
            write_reference()
        if step == total_steps:
            break

    stop.close()
    manager.discard_aside()  # --overwrite, and this run saved nothing
    # strict JSON: null where there is no value (no logged step), a checkpoint named only where one was written
    summary = {"steps": step, "epochs": step / iters,
               "final_loss": last_loss if math.isfinite(last_loss) else None, "interrupted": interrupted,
               "seconds": time.time() - started, "checkpoint": ckpt_path if os.path.exists(ckpt_path) else None,
               "resumable": None if manager.last_saved is None else str(manager.folder(manager.last_saved)),
               "skipped_images": int(dataset.skipped.item())}
    if ctx.is_main:
        with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2, allow_nan=False)
        if summary["skipped_images"]:
            logger.message(f"skipped {summary['skipped_images']} unreadable image(s) (--skip-bad-data)")
    loss_text = "no step logged" if summary["final_loss"] is None else f"final loss {summary['final_loss']:.4f}"
    logger.message(f"moco-scale: {'stopped' if interrupted else 'done'} at step {step}/{total_steps} after "
                   f"{summary['seconds']:.0f} s, {loss_text}; summary in {args.output_dir}/summary.json")
    logger.close()
    engine.close()
    return summary


def _is_collective_failure(e: RuntimeError) -> bool:
    """A peer died (kill -9, the OOM killer, a lost node) or the network dropped: gloo and NCCL raise
    RuntimeError (DistError in newer paths) from inside whichever collective noticed first."""
    text = str(e)
    return isinstance(e, torch.distributed.DistError) or any(
        mark in text for mark in ("gloo/transport", "NCCL", "Connection reset by peer", "Connection closed by peer"))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    given = [f for f in _IGNORED_REFERENCE_FLAGS if getattr(args, f[2:].replace("-", "_")) is not None]
    if given:
        print(f"moco-scale: ignoring {', '.join(given)}: the launcher (torchrun, deepspeed) sets the "
              "process group", file=sys.stderr)
    try:
        run(args)
    except KeyboardInterrupt:  # a second Ctrl-C: the first one asked for a save at the next step
        print("moco-scale pretrain: aborted by a second Ctrl-C; the newest checkpoint in --output-dir is intact "
              "(continue with --resume auto)", file=sys.stderr)
        return 130
    except NoSpaceError as e:
        print(f"moco-scale pretrain: error: {e}", file=sys.stderr)
        return 1
    except (ConfigError, DataError, UnknownArchError, ValueError) as e:
        rank = os.environ.get("RANK")
        where = f" (rank {rank})" if rank is not None and world_size_from_env() > 1 else ""
        print(f"moco-scale pretrain: error{where}: {e}", file=sys.stderr)
        # No barrier here: the other ranks may be blocked in a collective. Exiting lets the
        # launcher (torchrun, deepspeed) stop them at once instead of after --dist-timeout.
        return 2
    except RuntimeError as e:
        if not _is_collective_failure(e):
            raise
        rank = os.environ.get("RANK")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"moco-scale pretrain: error (rank {rank}): a collective failed, so another rank died or the network "
              f"dropped ({first}); continue with --resume auto from the last checkpoint", file=sys.stderr)
        return 1
    shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
