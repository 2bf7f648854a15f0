"""MoCo v3 pretraining as a typed config (resolved from the reference trainer's flags, checked in one place)
and the run it assembles: data, the model on the meta device, the engine, the checkpoint manager (resume
included) and the Trainer. commands/pretrain.py is its parser and error handling."""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

import torch

from moco_scale import schedules
from moco_scale.checkpoint.manager import CheckpointManager
from moco_scale.checkpoint.reference import reference_start, write_reference_file
from moco_scale.checkpoint.resume import (
    Resume,
    agree_on_resume,
    changed_settings,
    check_resumable,
    find_resume,
    reference_weights,
)
from moco_scale.config import ConfigError
from moco_scale.data import BUILTIN_IMAGE_SIZE, DeviceFeed, KeyedTwoViews, pretrain_dataset, pretrain_loader
from moco_scale.data.labelled import Splits, knn_splits, shard_loader, split_transform
from moco_scale.dist import DistContext, init_distributed, loader_workers, mean_across_ranks, world_size_from_env
from moco_scale.engines import EngineConfig, load_engine_config
from moco_scale.engines.base import Engine, resolve_precision
from moco_scale.eval.knn import evaluate_knn
from moco_scale.flops import peak_tflops, step_flops_per_image
from moco_scale.models.init import InitialState
from moco_scale.optim import OptimizerSpec
from moco_scale.train.config import ModelConfig, RunConfig, config_file, warmup_fits
from moco_scale.train.run import open_run
from moco_scale.train.trainer import Evaluate, Trainer


@dataclass(frozen=True)
class PretrainConfig:
    """Everything a pretraining run resolves from its flags, before any process talks to another."""

    run: RunConfig
    model: ModelConfig
    engine: EngineConfig
    optimizer: str
    lr: float  # base lr: the lr used is lr x batch / 256
    weight_decay: float
    warmup_epochs: int
    moco_m: float
    moco_m_cos: bool
    data: str | None
    crop_min: float
    augment: str
    workers: int  # per node, shared by its ranks
    skip_bad_data: bool
    reference_every: str
    device: str
    dist_timeout: float
    peak_tflops: float | None
    knn_every: int  # epochs; 0: no kNN curve
    knn_data: str | None
    knn_train_size: int

    @staticmethod
    def from_args(args: argparse.Namespace, world: int | None = None) -> PretrainConfig:
        """The one place a launch line is checked: architecture, batch split, warmup, engine and chunking."""
        world = world_size_from_env() if world is None else world
        image = args.image_size or (BUILTIN_IMAGE_SIZE if args.data is None else 224)
        model = ModelConfig(arch=args.arch, img_size=image, patch_size=args.patch_size, embed_dim=args.embed_dim,
                            depth=args.depth, num_heads=args.num_heads, stop_grad_conv1=args.stop_grad_conv1,
                            moco_dim=args.moco_dim, moco_mlp_dim=args.moco_mlp_dim, moco_t=args.moco_t)
        run = RunConfig.from_args(args, world)
        warmup_fits(args.warmup_epochs, args.epochs)
        engine = load_engine_config(args.engine_config, args.batch_size, world)
        if args.backbone_chunk is not None:
            engine = engine.replace(backbone_chunk=args.backbone_chunk)
        device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
        try:
            precision = resolve_precision(engine.requested_precision, device)
        except ValueError as e:
            raise ConfigError(f"engine config: {e}") from None
        engine.check(model.is_plain_vit, args.optimizer, precision)  # plan runs the same check
        if args.knn_data is not None and not args.knn_every:
            raise ConfigError("--knn-data names the data of the kNN curve: add --knn-every N (epochs)")
        return PretrainConfig(run=run, model=model, engine=engine, optimizer=args.optimizer, lr=args.lr,
                              weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, moco_m=args.moco_m,
                              moco_m_cos=args.moco_m_cos, data=args.data, crop_min=args.crop_min,
                              augment=args.augment, workers=args.workers, skip_bad_data=args.skip_bad_data,
                              reference_every=args.reference_every, device=args.device,
                              dist_timeout=args.dist_timeout, peak_tflops=args.peak_tflops,
                              knn_every=args.knn_every, knn_data=args.knn_data or args.data,
                              knn_train_size=args.knn_train_size)

    @property
    def scaled_lr(self) -> float:
        return schedules.scaled_lr(self.lr, self.run.global_batch)

    def schedule(self, epoch: float) -> dict[str, float]:
        """The reference's per-iteration lr (warmup, half cosine) and momentum coefficient."""
        return {"lr": schedules.learning_rate(epoch, self.scaled_lr, self.run.epochs, self.warmup_epochs),
                "moco_m": schedules.momentum(epoch, self.moco_m, self.run.epochs, self.moco_m_cos)}

    def resolved(self, ctx: DistContext, precision: str, workers: int) -> dict[str, Any]:
        return {**self.run.resolved(), "lr": self.scaled_lr, "workers_per_rank": workers, "device": str(ctx.device),
                "precision": precision, "dataset": self.data or "builtin:digits"}


def _resume(cfg: PretrainConfig, dataset_size: int, agreed: tuple[Resume | None] | None = None
            ) -> tuple[PretrainConfig, Resume | None]:
    """What --resume names (or `agreed`: rank 0's choice), checked against this run before any rank talks to
    another; the engine config that reads it."""
    resume = find_resume(cfg.run.resume, cfg.run.output_dir, int(os.environ.get("RANK", "0")) == 0) \
        if agreed is None else agreed[0]
    if resume is not None and not resume.is_file:
        trained = resume.meta.get("optimizer")
        if trained is not None and trained != cfg.optimizer:
            raise ConfigError(f"--resume {resume.path} was trained with --optimizer {trained}, this run asks for "
                              f"{cfg.optimizer}: its optimizer state cannot carry over; resume with --optimizer "
                              f"{trained}")
        cfg = replace(cfg, engine=check_resumable(resume, cfg.model.to_dict(), cfg.run.global_batch, dataset_size,
                                                  cfg.engine))
    return cfg, resume


def _knn_curve(cfg: PretrainConfig, splits: Splits | None, engine: Engine, ctx: DistContext,
               workers: int) -> Evaluate | None:
    """The kNN curve (--knn-every): both encoders' backbone features evaluated in place through the engine
    (a sharded model gathers per block, as its forward does) every N epochs and at the end. It draws nothing
    from torch's generator and leaves every module's mode as it was: the trajectory is the run's without it."""
    if splits is None:
        return None
    transform = split_transform(cfg.knn_data, cfg.model.img_size)
    # 2 x the per-rank batch: a training step's forward holds both views of its images, with their gradients
    loaders = [shard_loader(s, transform, 2 * cfg.run.per_rank_batch, ctx.world_size, ctx.rank, workers)
               for s in (splits.train, splits.val)]
    dtype = torch.float16 if ctx.device.type == "cuda" else torch.float32

    def evaluate(epoch: float) -> dict[str, float]:
        last = round(epoch * cfg.run.iters_per_epoch) >= cfg.run.total_steps
        if round(epoch) % cfg.knn_every and not last:
            return {}
        start, out = time.perf_counter(), {}
        for encoder, prefix in (("base", ""), ("momentum", "momentum_")):
            results = evaluate_knn(partial(engine.call, f"{encoder}_features"), *loaders, len(splits.classes),
                                   ctx, dtype)
            out.update({f"{prefix}{k}": v for k, v in results.items() if k != "knn_images"})
        return {**out, "knn_images": results["knn_images"], "knn_seconds": time.perf_counter() - start}
    return evaluate


def _data(cfg: PretrainConfig) -> tuple[PretrainConfig, KeyedTwoViews]:
    dataset = pretrain_dataset(cfg.data, cfg.model.img_size, cfg.crop_min, cfg.run.seed, cfg.skip_bad_data,
                               cfg.augment)
    return replace(cfg, run=cfg.run.with_dataset(len(dataset), cfg.data or "the built-in dataset")), dataset


def build_pretraining(args: argparse.Namespace) -> tuple[Trainer, PretrainConfig, KeyedTwoViews, Resume | None]:
    """The whole run assembled and resumed, ready to train: every input is checked first (flags, engine JSON,
    data, the checkpoint to resume), then the process group, the engine on a meta-device model, the folder."""
    cfg, dataset = _data(PretrainConfig.from_args(args))
    cfg, resume = _resume(cfg, len(dataset))
    knn_data = knn_splits(cfg.knn_data, cfg.model.img_size, cfg.knn_train_size, cfg.run.world_size) \
        if cfg.knn_every else None  # checked before any process group exists
    ctx = init_distributed(cfg.device, cfg.dist_timeout, require_group=cfg.engine.needs_process_group)
    resume, changed = agree_on_resume(resume, ctx)
    if changed:
        cfg, resume = _resume(cfg, len(dataset), agreed=(resume,))
    torch.manual_seed(cfg.run.seed)
    model = cfg.model.build(device="meta")
    initial = None
    if resume is not None and resume.is_file:
        initial = InitialState(model, reference_weights(resume, model, cfg.model.arch))
    engine = cfg.engine.build(model, OptimizerSpec(cfg.optimizer, cfg.weight_decay), ctx, initial=initial)
    workers = loader_workers(cfg.workers, ctx.local_world_size)
    loader = pretrain_loader(dataset, cfg.run.global_batch, ctx.world_size, ctx.rank, cfg.run.seed, workers,
                             pin_memory=ctx.device.type == "cuda")
    resolved = {**cfg.resolved(ctx, engine.precision, workers), "resumed_from": resume and str(resume.path)}
    aside = open_run(cfg.run.output_dir, ctx, config_file(args, cfg.engine.to_dict(), resolved,
                                                          image_size=cfg.model.img_size), cfg.run.overwrite,
                     resuming=cfg.run.resume is not None)
    say = (lambda text: print(text, file=sys.stderr)) if ctx.is_main else (lambda text: None)  # noqa: E731
    manager = CheckpointManager(cfg.run.output_dir, ctx, cfg.run.keep_last, cfg.run.save_every,
                                cfg.reference_every, warn=say)
    manager.discard_after_first_save = aside
    if aside is not None:
        say(f"moco-scale: --overwrite: moved the previous run to {aside}; it is deleted once this run has saved "
            "its first checkpoint")
    record = {"model": cfg.model.to_dict(), "engine": cfg.engine.layout, "precision": engine.precision,
              "seed": cfg.run.seed, "optimizer": cfg.optimizer, "epochs": cfg.run.epochs}
    trainer = Trainer(cfg.run, ctx, engine, DeviceFeed(loader, ctx.device, dataset.on_device), loader.batch_sampler,
                      cfg.schedule, manager, record,
                      flops_per_image=step_flops_per_image(cfg.model.to_dict())["train"],
                      peak_tflops=cfg.peak_tflops or peak_tflops(ctx.device, engine.precision),
                      watch=model.first_layer_names(), evaluate=_knn_curve(cfg, knn_data, engine, ctx, workers))
    manager.track(engine, trainer, exporter=lambda: write_reference_file(
        engine, reference_path(cfg), cfg.model.arch, trainer.step, cfg.run.iters_per_epoch, cfg.model.to_dict()))
    _restore(trainer, manager, resume, say)
    return trainer, cfg, dataset, resume


def reference_path(cfg: PretrainConfig) -> str:
    return os.path.join(cfg.run.output_dir, "checkpoint.pth.tar")


def _restore(trainer: Trainer, manager: CheckpointManager, resume: Resume | None, say) -> None:
    """Continue where --resume says: a folder's whole state, or a file's weights (with its optimizer where the
    engine takes it) at the step it records, saved at once as a resumable checkpoint."""
    if resume is None:
        return
    if not resume.is_file:
        for line in changed_settings(resume.meta, trainer.record):
            say(f"moco-scale: warning: --resume {resume.path}: {line}")
        manager.load(resume.path)
    else:
        trainer.step = reference_start(resume.ckpt, trainer.run.iters_per_epoch)
        why = trainer.engine.load_reference_optimizer(resume.ckpt.get("optimizer"), resume.ckpt.get("scaler"))
        if why is not None:
            say(f"moco-scale: warning: --resume {resume.path}: the optimizer starts fresh ({why}); weights and "
                "position are restored")
    manager.start_timeline(trainer.step)  # the later folders of an abandoned timeline go aside
    if resume.is_file:
        manager.save()  # the imported state, resumable without the file


def pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """Train; returns the summary (also written to DIR/summary.json)."""
    trainer, cfg, dataset, resume = build_pretraining(args)
    trainer.notes.append(f"moco-scale: {cfg.model.arch}, world {cfg.run.world_size} on {trainer.ctx.device}, global "
                         f"batch {cfg.run.global_batch}, {cfg.run.iters_per_epoch} steps/epoch, {cfg.run.total_steps} "
                         f"steps, engine {cfg.engine.label} ({trainer.engine.precision}), output {cfg.run.output_dir}")
    classes = getattr(dataset.base, "classes", None)
    trainer.notes.append(f"data: {len(dataset)} images" + (f" in {len(classes)} class folders" if classes else "")
                         + f" from {cfg.data or 'the built-in digits'}")
    if resume is not None:
        epoch, batch = divmod(trainer.step, cfg.run.iters_per_epoch)
        trainer.notes.append(f"resumed from {resume.path} at step {trainer.step} (epoch {epoch}, batch {batch})")
    summary = trainer.train()
    path = reference_path(cfg)
    skipped = round(mean_across_ranks(torch.tensor(float(dataset.skipped_count()), device=trainer.ctx.device)).item()
                    * trainer.ctx.world_size)  # every rank's loader processes, summed
    summary.update(checkpoint=path if os.path.exists(path) else None, skipped_images=skipped)
    if summary["skipped_images"]:
        trainer.logger.message(f"skipped {summary['skipped_images']} unreadable image(s) (--skip-bad-data)")
    return trainer.close(summary)
