"""Typed run configs, resolved once from the command line and checked in one place (after torchtitan's
config dataclasses): what every training command shares (`RunConfig`: the folder, the length, the batch, the
save cadence) and what builds the model (`ModelConfig`). `to_dict()` is what config.json and meta.json hold."""

from __future__ import annotations

import argparse
import dataclasses
import math
import platform
import sys
from dataclasses import dataclass
from typing import Any

import torch

from moco_scale.config import ConfigError
from moco_scale.models import ARCHS, MoCo, UnknownArchError, build_moco
from moco_scale.models.vit import VIT_ARCHS
from moco_scale.paths import writable_folder_problem


@dataclass(frozen=True)
class ModelConfig:
    """build_moco's arguments (meta.json's "model": a resume must match them key by key)."""

    arch: str
    img_size: int
    patch_size: int | None = None
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    stop_grad_conv1: bool = False
    moco_dim: int = 256
    moco_mlp_dim: int = 4096
    moco_t: float = 1.0

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise UnknownArchError(f"unknown architecture -a {self.arch}; known: {', '.join(ARCHS)}")

    @property
    def is_plain_vit(self) -> bool:
        """A ViT without BatchNorm in its backbone (no conv stem): its images may be split into chunks."""
        return self.arch in VIT_ARCHS and not VIT_ARCHS[self.arch].conv_stem

    def build(self, device: str = "meta", seed: int | None = None) -> MoCo:
        return build_moco(**self.to_dict(), seed=seed, device=device)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class RunConfig:
    """The loop's settings: where the run lives, how long it runs, how it saves. `dataset_size` is filled once the
    data is read; the step counts follow from it."""

    output_dir: str
    epochs: int
    global_batch: int
    world_size: int
    print_freq: int = 10
    save_every: int = 0
    keep_last: int = 2
    max_steps: int | None = None
    seed: int = 0
    resume: str | None = None
    overwrite: bool = False
    dataset_size: int = 0

    def __post_init__(self) -> None:
        if why := writable_folder_problem(self.output_dir):
            raise ConfigError(f"--output-dir {self.output_dir or repr('')} {why}")
        if self.global_batch <= 0 or self.global_batch % self.world_size:
            raise ConfigError(f"global batch -b {self.global_batch} must be a positive multiple of the world size "
                              f"{self.world_size} (each rank takes an equal share, as the reference requires)")

    def with_dataset(self, size: int, source: str) -> RunConfig:
        if size < self.global_batch:
            raise ConfigError(f"global batch -b {self.global_batch} is larger than the dataset ({size} images in "
                              f"{source})")
        return dataclasses.replace(self, dataset_size=size)

    @property
    def per_rank_batch(self) -> int:
        return self.global_batch // self.world_size

    @property
    def iters_per_epoch(self) -> int:
        return self.dataset_size // self.global_batch

    @property
    def total_steps(self) -> int:
        full = self.iters_per_epoch * self.epochs
        return full if self.max_steps is None else min(self.max_steps, full)

    def resolved(self) -> dict[str, Any]:
        return {"world_size": self.world_size, "per_rank_batch": self.per_rank_batch,
                "iters_per_epoch": self.iters_per_epoch, "total_steps": self.total_steps}

    @staticmethod
    def from_args(args: argparse.Namespace, world: int, epochs: int | None = None) -> RunConfig:
        get = lambda name, default=None: getattr(args, name, default)  # noqa: E731
        return RunConfig(output_dir=args.output_dir, epochs=epochs or args.epochs, global_batch=args.batch_size,
                         world_size=world, print_freq=get("print_freq", 10), save_every=get("save_every", 0),
                         keep_last=get("keep_last", 2), max_steps=get("max_steps"), seed=get("seed", 0),
                         resume=get("resume"), overwrite=get("overwrite", False))


def warmup_fits(warmup_epochs: float, epochs: int) -> None:
    if 0 < epochs <= warmup_epochs:
        raise ConfigError(f"--warmup-epochs {warmup_epochs:g} must be below --epochs {epochs}")


def config_file(args: argparse.Namespace, engine: dict[str, Any], resolved: dict[str, Any],
                **filled: Any) -> dict[str, Any]:
    """config.json: the flags (defaults filled in, and `filled`: what the run resolved for a flag left out, such
    as the image size), the engine config, what was resolved, versions."""
    flags = {**{k: v for k, v in vars(args).items() if k != "local_rank"}, **filled}
    return {"args": flags, "engine": engine, "resolved": resolved,
            "versions": {"torch": torch.__version__, "python": platform.python_version()}, "command": sys.argv}


def finite(value: float) -> float | None:
    """A metric for strict JSON: None where it is NaN or infinite (no logged step)."""
    return value if math.isfinite(value) else None
