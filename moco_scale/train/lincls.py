"""Linear evaluation assembled on the shared Trainer: the frozen backbone and its classifier under the DDP
engine (one process or any launcher), the reference's per-epoch cosine SGD, exact top-1/top-5 at epoch ends,
resumable checkpoints through the same manager, and DIR/lincls_checkpoint.pth.tar (the classifier) as its
export. An evaluation of another pretrained checkpoint never resumes over this one's."""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader

from moco_scale.checkpoint.io import atomic_save
from moco_scale.checkpoint.manager import CheckpointManager
from moco_scale.checkpoint.reference import checkpoint_identity, pretrained_encoder
from moco_scale.checkpoint.resume import Resume, agree_on_resume, resume_on_pretrained
from moco_scale.config import ConfigError
from moco_scale.data import GlobalBatchSampler
from moco_scale.data.augment import IMAGENET_MEAN, IMAGENET_STD
from moco_scale.data.labelled import Keyed, Splits, image_splits, shard_loader, split_transform
from moco_scale.dist import DistContext, init_distributed, world_size_from_env
from moco_scale.engines import DDPConfig
from moco_scale.eval.linear import LinearClassifier, accuracy, per_epoch_cosine
from moco_scale.models.init import InitialState, draw_seed
from moco_scale.models.vit import VIT_ARCHS
from moco_scale.optim import OptimizerSpec
from moco_scale.train.config import RunConfig, config_file
from moco_scale.train.run import open_run
from moco_scale.train.trainer import Trainer


@dataclass(frozen=True)
class LinclsConfig:
    run: RunConfig
    data: str | None
    pretrained: str
    arch: str | None
    lr: float | None  # base lr x batch / 256; None: 3 for a ViT, 0.1 for a ResNet
    momentum: float
    weight_decay: float
    bn: bool
    workers: int
    eval_every: int
    evaluate_only: bool
    device: str

    @staticmethod
    def from_args(args: argparse.Namespace) -> LinclsConfig:
        run = replace(RunConfig.from_args(args, world_size_from_env()), print_freq=1)
        if args.evaluate and args.resume is None:
            raise ConfigError("-e/--evaluate evaluates a saved classifier: name it with --resume auto|PATH")
        return LinclsConfig(run=run, data=args.data, pretrained=args.pretrained, arch=args.arch, lr=args.lr,
                            momentum=args.momentum, weight_decay=args.wd, bn=args.bn, workers=args.workers,
                            eval_every=args.print_freq, evaluate_only=args.evaluate, device=args.device)

    def scaled_lr(self, arch: str) -> float:
        base = self.lr if self.lr is not None else (3.0 if arch in VIT_ARCHS else 0.1)
        return base * self.run.global_batch / 256


def _transforms(size: int, data: str | None) -> tuple[T.Compose, T.Compose]:
    """RandomResizedCrop + flip for training; Resize 256 + CenterCrop 224 (scaled to the model's size) to
    evaluate; the digits are already the model's size."""
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(),
                       T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    return train, split_transform(data, size)


def _loaders(cfg: LinclsConfig, splits: Splits, size: int, ctx: DistContext) -> tuple[DataLoader, DataLoader]:
    train_tf, val_tf = _transforms(size, cfg.data)
    sampler = GlobalBatchSampler(len(splits.train), cfg.run.global_batch, ctx.world_size, ctx.rank, cfg.run.seed)
    train = DataLoader(Keyed(splits.train, train_tf, cfg.run.seed), batch_sampler=sampler, num_workers=cfg.workers,
                       persistent_workers=cfg.workers > 0)
    val = shard_loader(splits.val, val_tf, 256, ctx.world_size, ctx.rank, cfg.workers)
    return train, val


def _resume(cfg: LinclsConfig, identity: dict[str, Any], agreed: tuple[Resume | None] | None = None
            ) -> Resume | None:
    """--resume (or `agreed`: rank 0's choice): a folder that evaluated this very pretrained checkpoint."""
    return resume_on_pretrained(cfg.run.resume, cfg.run.output_dir, cfg.pretrained, identity, "linear evaluation",
                                agreed)


def build_lincls(args: argparse.Namespace) -> tuple[Trainer, LinclsConfig, Splits, DataLoader, Resume | None]:
    cfg = LinclsConfig.from_args(args)
    encoder, dim, state, settings = pretrained_encoder(cfg.pretrained, cfg.arch)
    size = settings.get("img_size") or 224
    splits = image_splits(cfg.data, size)
    run = cfg.run.with_dataset(len(splits.train), splits.source)
    cfg = replace(cfg, run=replace(run, print_freq=run.iters_per_epoch))  # one log line per epoch
    identity = checkpoint_identity(cfg.pretrained)
    resume = _resume(cfg, identity)
    ctx = init_distributed(cfg.device, require_group=False)
    resume, changed = agree_on_resume(resume, ctx)
    if changed:
        resume = _resume(cfg, identity, agreed=(resume,))
    torch.manual_seed(cfg.run.seed)
    model = LinearClassifier(encoder, dim, len(splits.classes), cfg.bn)
    model.init_seed = draw_seed()
    initial = InitialState(model, {f"backbone.{k}": v for k, v in state.items()})
    engine = DDPConfig(precision="fp32").build(model, OptimizerSpec("sgd", cfg.weight_decay, cfg.momentum), ctx,
                                                initial=initial)
    train_loader, val_loader = _loaders(cfg, splits, size, ctx)
    lr = cfg.scaled_lr(settings["arch"])
    resolved = {**cfg.run.resolved(), "lr": lr, "classes": len(splits.classes), "val_images": len(splits.val),
                "pretrained": identity, "dataset": splits.source}
    aside = open_run(cfg.run.output_dir, ctx, config_file(args, engine_config(), resolved), cfg.run.overwrite,
                     resuming=resume is not None)
    manager = CheckpointManager(cfg.run.output_dir, ctx, cfg.run.keep_last, export_every="epoch",
                                warn=lambda text: print(text, file=sys.stderr) if ctx.is_main else None)
    manager.discard_after_first_save = aside
    frozen = {k: v.clone() for k, v in engine.model.backbone.state_dict().items()}
    evaluate = _evaluator(cfg, engine, val_loader, ctx, frozen)
    trainer = Trainer(cfg.run, ctx, engine, train_loader, train_loader.batch_sampler,
                      lambda epoch: {"lr": per_epoch_cosine(epoch, lr, cfg.run.epochs)}, manager,
                      {"pretrained": identity, "arch": settings["arch"]}, evaluate=evaluate, desc="lincls")
    manager.track(engine, trainer, exporter=lambda: _export(cfg, trainer, settings["arch"]))
    if resume is not None:
        manager.load(resume.path)
    return trainer, cfg, splits, val_loader, resume


def engine_config() -> dict[str, Any]:
    return DDPConfig(precision="fp32").to_dict()


def _evaluator(cfg: LinclsConfig, engine, val_loader: DataLoader, ctx: DistContext,
               frozen: dict[str, torch.Tensor]):
    """Top-1/top-5 every `eval_every` epochs and at the end; the first also checks, as the reference does, that
    nothing but the classifier moved."""
    def evaluate(epoch: float) -> dict[str, Any]:
        for k, v in engine.model.backbone.state_dict().items():
            if not torch.equal(v, frozen[k]):
                raise RuntimeError(f"the frozen backbone changed during training ({k})")
        done = round(epoch)
        if done % cfg.eval_every and epoch < cfg.run.epochs:
            return {}
        return accuracy(lambda x: engine.call("forward", x), val_loader, ctx)
    return evaluate


def _export(cfg: LinclsConfig, trainer: Trainer, arch: str) -> None:
    """DIR/lincls_checkpoint.pth.tar: the classifier (its BN statistics too) and what it evaluated."""
    if trainer.ctx.is_main:
        classifier = {k: v.detach().cpu().clone() for k, v in trainer.engine.model.classifier.state_dict().items()}
        atomic_save({"epoch": trainer.step // trainer.run.iters_per_epoch, "classifier": classifier,
                     "history": trainer.history, "pretrained": trainer.record["pretrained"], "pretrained_arch": arch},
                    os.path.join(cfg.run.output_dir, "lincls_checkpoint.pth.tar"))


def lincls(args: argparse.Namespace) -> dict[str, Any]:
    """Train the classifier (or only evaluate a saved one, -e); writes DIR/lincls.json and returns it."""
    trainer, cfg, splits, val_loader, resume = build_lincls(args)
    arch = trainer.record["arch"]
    trainer.notes.append(f"lincls: {arch} from {cfg.pretrained}, {len(splits.classes)} classes, {len(splits.train)} "
                         f"train / {len(splits.val)} val images, world {cfg.run.world_size}, batch "
                         f"{cfg.run.global_batch}, lr {cfg.scaled_lr(arch):g}")
    final, summary = trainer.train_or_evaluate(
        cfg.evaluate_only, lambda: accuracy(lambda x: trainer.engine.call("forward", x), val_loader, trainer.ctx),
        resume and str(resume.path))
    history = trainer.history
    out = {**summary, "pretrained": cfg.pretrained, "arch": arch, "epochs": cfg.run.epochs, "top1": final.get("top1"),
           "top5": final.get("top5"), "correct": final.get("correct"), "images": final.get("images"),
           "history": history}
    if trainer.ctx.is_main:
        with open(os.path.join(cfg.run.output_dir, "lincls.json"), "w") as f:
            json.dump(out, f, indent=2)
        print(f"lincls: top-1 {final.get('top1', float('nan')):.2f}%, top-5 {final.get('top5', float('nan')):.2f}% "
              f"on {splits.source}", flush=True)
    return out
