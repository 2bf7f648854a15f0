"""End-to-end fine-tuning and transfer, assembled on the shared Trainer: a pretrained backbone loaded strictly
with a fresh head (models/classifier.py), a published recipe (train/recipes.py) with its transforms and Mixup
(data/finetune.py), any engine JSON, timm's parameter groups with the lr of each group set at every step, exact
top-1/top-5 at epoch ends, resumable checkpoints through the same manager, and DIR/finetuned.pth (the whole
classifier in timm's/torchvision's names, DeiT's {"model": ...} layout) at the end."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from moco_scale.checkpoint.io import atomic_save
from moco_scale.checkpoint.manager import CheckpointManager
from moco_scale.checkpoint.reference import (
    CheckpointError,
    checkpoint_identity,
    describe_mismatch,
    pretrained_backbone,
)
from moco_scale.checkpoint.resume import Resume, agree_on_resume, check_resumable, resume_on_pretrained
from moco_scale.config import ConfigError
from moco_scale.data import GlobalBatchSampler
from moco_scale.data.finetune import MixedFeed, finetune_splits, finetune_transforms, mixup_of
from moco_scale.data.labelled import Keyed, Splits, shard_loader
from moco_scale.dist import DistContext, init_distributed, loader_workers, world_size_from_env
from moco_scale.engines import EngineConfig, load_engine_config
from moco_scale.eval.linear import accuracy
from moco_scale.models.classifier import Classifier, build_classifier
from moco_scale.models.init import InitialState, draw_seed
from moco_scale.optim import OptimizerSpec
from moco_scale.train.config import RunConfig, config_file
from moco_scale.train.recipes import OVERRIDES, Recipe, learning_rate, resolve_recipe
from moco_scale.train.run import open_run
from moco_scale.train.trainer import Trainer


def recipe_from_args(args: argparse.Namespace, arch: str) -> Recipe:
    return resolve_recipe(args.recipe, arch, {k: getattr(args, k) for k in OVERRIDES})


def loss_of(r: Recipe) -> nn.Module:
    """DeiT's criterion: soft-target CE under Mixup/CutMix (smoothing folded into the targets), else label
    smoothing, else plain cross-entropy."""
    if r.mixup_active:
        return SoftTargetCrossEntropy()
    return LabelSmoothingCrossEntropy(r.smoothing) if r.smoothing else nn.CrossEntropyLoss()


@dataclass(frozen=True)
class FinetuneConfig:
    run: RunConfig
    recipe: Recipe
    engine: EngineConfig
    pretrained: str
    settings: dict[str, Any]  # the backbone's shape (models/classifier.SHAPE_KEYS)
    data: str | None
    dataset: str | None
    workers: int
    eval_every: int
    evaluate_only: bool
    from_scratch: bool
    device: str
    dist_timeout: float

    @property
    def image_size(self) -> int:
        return self.settings.get("img_size") or 224

    def model_record(self, classes: int) -> dict[str, Any]:
        """meta.json's "model": what a resume must match."""
        return {**self.settings, "classes": classes, "drop_path": self.recipe.drop_path}


def _config(args: argparse.Namespace) -> tuple[FinetuneConfig, dict[str, torch.Tensor]]:
    """Flags, recipe, engine JSON and the pretrained backbone, checked before any process group exists."""
    if args.evaluate and args.resume is None:
        raise ConfigError("--evaluate evaluates a fine-tuned checkpoint: name it with --resume auto|PATH")
    state, settings = pretrained_backbone(args.pretrained, args.arch, args.num_heads)
    recipe = recipe_from_args(args, settings["arch"])
    world = world_size_from_env()
    run = RunConfig(output_dir=args.output_dir, epochs=recipe.epochs, global_batch=recipe.batch_size, world_size=world,
                    print_freq=args.print_freq, save_every=args.save_every, keep_last=args.keep_last,
                    max_steps=args.max_steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite)
    if recipe.mixup_active and run.per_rank_batch % 2:
        raise ConfigError(f"--mixup/--cutmix mix each rank's batch with its reverse: the per-rank batch "
                          f"{run.per_rank_batch} (-b {run.global_batch} over {world}) must be even")
    engine = load_engine_config(args.engine_config, recipe.batch_size, world)
    cfg = FinetuneConfig(run=run, recipe=recipe, engine=engine, pretrained=args.pretrained, settings=settings,
                         data=args.data, dataset=args.dataset, workers=args.workers, eval_every=args.eval_every,
                         evaluate_only=args.evaluate, from_scratch=args.from_scratch, device=args.device,
                         dist_timeout=args.dist_timeout)
    return cfg, state


def _resume(cfg: FinetuneConfig, identity: dict[str, Any], classes: int,
            agreed: tuple[Resume | None] | None = None) -> tuple[FinetuneConfig, Resume | None]:
    """--resume names (or `agreed`: rank 0's choice) a fine-tuning checkpoint folder of the same pretrained
    checkpoint, model, batch and data."""
    resume = resume_on_pretrained(cfg.run.resume, cfg.run.output_dir, cfg.pretrained, identity, "fine-tuning",
                                  agreed, file_hint="; start from a file with --pretrained")
    if resume is None:
        return cfg, None
    engine = check_resumable(resume, cfg.model_record(classes), cfg.run.global_batch, cfg.run.dataset_size,
                             cfg.engine)
    return replace(cfg, engine=engine), resume


def strict_initial_state(model: Classifier, backbone: dict[str, torch.Tensor], source: str,
                         from_scratch: bool = False) -> InitialState:
    """The model's starting values: every backbone tensor from the checkpoint (all of them used, shapes equal),
    the head fresh; anything else is an error naming the keys. `from_scratch`: the checkpoint gives only the
    shape, every value is MoCo v3's initialisation (the baseline pretraining must beat)."""
    if from_scratch:
        return InitialState(model)
    want = {k.removeprefix("net."): v for k, v in model.state_dict().items()}
    want = {k: v for k, v in want.items() if k not in model.head_keys()}
    mismatch = describe_mismatch(want, backbone)
    if mismatch:
        raise CheckpointError(f"--pretrained {source} does not fit the {model.net.__class__.__name__} it describes "
                              f"({mismatch})")
    return InitialState(model, {f"net.{k}": v for k, v in backbone.items()})


def _loaders(cfg: FinetuneConfig, splits: Splits, ctx: DistContext, workers: int) -> tuple[DataLoader, DataLoader]:
    train_tf, eval_tf = finetune_transforms(cfg.recipe, cfg.image_size)
    repeats = cfg.recipe.repeated_aug if ctx.world_size > 1 else 1  # DeiT repeats only when distributed
    sampler = GlobalBatchSampler(len(splits.train), cfg.run.global_batch, ctx.world_size, ctx.rank, cfg.run.seed,
                                 repeats=max(repeats, 1))
    pin = ctx.device.type == "cuda"
    train = DataLoader(Keyed(splits.train, train_tf, cfg.run.seed, every_generator=True), batch_sampler=sampler,
                       num_workers=workers, persistent_workers=workers > 0, pin_memory=pin)
    # DeiT's evaluation batch: 1.5 x the training one
    val = shard_loader(splits.val, eval_tf, max(1, 3 * cfg.run.per_rank_batch // 2), ctx.world_size, ctx.rank,
                       workers)
    return train, val


def build_finetune(args: argparse.Namespace) -> tuple[Trainer, FinetuneConfig, Splits, DataLoader, Resume | None]:
    cfg, backbone = _config(args)
    splits = finetune_splits(cfg.data, cfg.dataset, cfg.image_size)
    if len(splits.val) == 0:
        raise ConfigError(f"{splits.source}: the evaluation split is empty")
    cfg = replace(cfg, run=cfg.run.with_dataset(len(splits.train), splits.source))
    identity = checkpoint_identity(cfg.pretrained)
    classes = len(splits.classes)
    cfg, resume = _resume(cfg, identity, classes)
    ctx = init_distributed(cfg.device, cfg.dist_timeout, require_group=cfg.engine.needs_process_group)
    resume, changed = agree_on_resume(resume, ctx)
    if changed:
        cfg, resume = _resume(cfg, identity, classes, agreed=(resume,))
    torch.manual_seed(cfg.run.seed)
    model = build_classifier(cfg.settings, classes, cfg.recipe.drop_path, loss_of(cfg.recipe), draw_seed())
    initial = strict_initial_state(model, backbone, cfg.pretrained, cfg.from_scratch)
    spec = model.group_spec(cfg.recipe.weight_decay, cfg.recipe.layer_decay)
    optimizer = OptimizerSpec("adamw", cfg.recipe.weight_decay, groups=lambda m: m.param_groups(spec))
    engine = cfg.engine.build(model, optimizer, ctx, initial=initial)
    workers = loader_workers(cfg.workers, ctx.local_world_size)
    train_loader, val_loader = _loaders(cfg, splits, ctx, workers)
    resolved = {**cfg.run.resolved(), "recipe": cfg.recipe.to_json(), "classes": classes,
                "train_images": len(splits.train), "val_images": len(splits.val), "pretrained": identity,
                "model": cfg.settings, "dataset": splits.source, "precision": engine.precision,
                "repeated_aug_applied": ctx.world_size > 1 and cfg.recipe.repeated_aug > 1,
                "param_groups": [{k: v for k, v in g.items() if k != "names"} | {"tensors": len(g["names"])}
                                 for g in spec]}
    aside = open_run(cfg.run.output_dir, ctx, config_file(args, cfg.engine.to_dict(), resolved), cfg.run.overwrite,
                     resuming=resume is not None)
    say = (lambda text: print(text, file=sys.stderr)) if ctx.is_main else (lambda text: None)  # noqa: E731
    manager = CheckpointManager(cfg.run.output_dir, ctx, cfg.run.keep_last, cfg.run.save_every, export_every="end",
                                warn=say)
    manager.discard_after_first_save = aside
    record = {"pretrained": identity, "from_scratch": cfg.from_scratch, "model": cfg.model_record(classes),
              "engine": cfg.engine.layout,
              "precision": engine.precision, "seed": cfg.run.seed, "recipe": cfg.recipe.to_json()}
    feed = MixedFeed(train_loader, train_loader.batch_sampler, cfg.run.iters_per_epoch, ctx.device,
                     mixup_of(cfg.recipe, classes), cfg.run.seed, ctx.rank)
    trainer = Trainer(cfg.run, ctx, engine, feed, train_loader.batch_sampler,
                      lambda epoch: {"lr": learning_rate(epoch, cfg.recipe)}, manager, record,
                      evaluate=_evaluator(cfg, engine, val_loader, ctx), watch=model.first_layer_names(),
                      desc="finetune")
    manager.track(engine, trainer, exporter=lambda: _export(cfg, trainer, splits.classes))
    if resume is not None:
        manager.load(resume.path)
    return trainer, cfg, splits, val_loader, resume


def _evaluator(cfg: FinetuneConfig, engine, val_loader: DataLoader, ctx: DistContext):
    """Top-1/top-5 over the whole evaluation split every `eval_every` epochs and at the end."""
    def evaluate(epoch: float) -> dict[str, Any]:
        last = round(epoch * cfg.run.iters_per_epoch) >= cfg.run.total_steps
        if round(epoch) % cfg.eval_every and not last:
            return {}
        return accuracy(lambda x: engine.call("forward", x), val_loader, ctx)
    return evaluate


def _export(cfg: FinetuneConfig, trainer: Trainer, classes: list[str]) -> None:
    """DIR/finetuned.pth: the whole classifier, DeiT's layout ({"model": timm/torchvision names}), and what made it
    (a collective: rank 0 gathers one tensor at a time)."""
    state = trainer.engine.reference_state()
    if state is not None:
        model = {k.removeprefix("net."): v for k, v in state["state_dict"].items()}
        atomic_save({"model": model, "moco_scale": {"model": cfg.settings, "classes": classes,
                                                    "step": trainer.step, "recipe": cfg.recipe.to_json(),
                                                    "history": trainer.history}},
                    os.path.join(cfg.run.output_dir, "finetuned.pth"))


def _best(history: list[dict[str, Any]]) -> dict[str, Any]:
    return max(history, key=lambda row: row["top1"]) if history else {}


def finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune (or only evaluate a fine-tuned checkpoint, --evaluate); writes DIR/finetune.json and returns it."""
    trainer, cfg, splits, val_loader, resume = build_finetune(args)
    r = cfg.recipe
    trainer.notes.append(
        f"finetune: {cfg.settings['arch']} ({cfg.settings.get('num_heads') or '-'} heads) from {cfg.pretrained}, "
        f"recipe {r.recipe}, {len(splits.classes)} classes, {len(splits.train)} train / {len(splits.val)} val images "
        f"({splits.source}), world {cfg.run.world_size}, batch {cfg.run.global_batch}, lr {r.lr:g}, "
        f"{cfg.run.total_steps} steps, engine {cfg.engine.label} ({trainer.engine.precision})")
    if resume is not None:
        trainer.notes.append(f"resumed from {resume.path} at step {trainer.step}")
    final, summary = trainer.train_or_evaluate(
        cfg.evaluate_only, lambda: accuracy(lambda x: trainer.engine.call("forward", x), val_loader, trainer.ctx),
        resume and str(resume.path))
    history = trainer.history
    best = _best(history)
    out = {**summary, "pretrained": cfg.pretrained, "arch": cfg.settings["arch"], "recipe": r.to_json(),
           "dataset": splits.source, "top1": final.get("top1"), "top5": final.get("top5"),
           "correct": final.get("correct"), "images": final.get("images"), "best_top1": best.get("top1"),
           "best_epoch": best.get("epoch"), "history": history}
    if trainer.ctx.is_main:
        with open(os.path.join(cfg.run.output_dir, "finetune.json"), "w") as f:
            json.dump(out, f, indent=2)
        line = f"finetune: top-1 {final.get('top1', float('nan')):.2f}%, top-5 {final.get('top5', float('nan')):.2f}%"
        if best:
            line += f" (best top-1 {best['top1']:.2f}% at epoch {best['epoch']:g})"
        print(f"{line} on {splits.source}", flush=True)
    return out
