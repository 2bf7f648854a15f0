"""Fine-tuning recipes as published (FINETUNE_SPEC.md), resolved once into one flat record, and their learning-rate
schedules as pure functions of the fractional epoch.

- `deit`: DeiT's main.py defaults, MoCo v3's end-to-end fine-tuning ("all the default DeiT configs").
- `mae`: MAE's fine-tuning (layer-wise lr decay, per-iteration cosine); its ViT-L/H values for those sizes.
- `cifar10`, `cifar100`, `flowers`, `pets`: MoCo v3's transfer runs (DeiT's code, DeiT's schedule, the
  transfer transforms: RandomResizedCrop(scale 0.05-1) + flip for training, Resize 256 + CenterCrop 224 to test).

Every value can be overridden by the flag of the same name; `--lr` is the base lr, scaled by batch / `lr_batch`
as each source scales it (DeiT 512, MAE 256).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from moco_scale.config import ConfigError
from moco_scale.models.resnet import RESNET_ARCHS

RAND_AUGMENT = "rand-m9-mstd0.5-inc1"


@dataclass(frozen=True)
class Recipe:
    """One resolved recipe. `schedule` "epoch" is DeiT's (timm's cosine stepped after each epoch: epoch e trains at
    the scheduler's value for e - 1, warmup rising from `warmup_lr`), "step" MAE's (per iteration, warmup from 0)."""

    recipe: str
    base_lr: float
    lr_batch: int
    weight_decay: float
    epochs: int
    warmup_epochs: int
    warmup_lr: float
    min_lr: float
    smoothing: float
    mixup: float
    cutmix: float
    mixup_switch_prob: float
    drop_path: float
    aa: str | None
    reprob: float
    repeated_aug: int
    layer_decay: float | None
    batch_size: int
    eval_crop_pct: float
    schedule: str = "epoch"
    train_scale: tuple[float, float] = (0.08, 1.0)
    interpolation: str = "bicubic"
    color_jitter: float | None = 0.3  # DeiT's; timm skips it under RandAugment

    @property
    def lr(self) -> float:
        """The peak lr: base x batch / lr_batch."""
        return self.base_lr * self.batch_size / self.lr_batch

    @property
    def mixup_active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def to_json(self) -> dict[str, Any]:
        """--print-recipe's object and config.json's "recipe": the resolved values, lr after scaling."""
        out = dataclasses.asdict(self)
        out["train_scale"] = list(self.train_scale)
        return {"recipe": self.recipe, "lr": self.lr, **{k: v for k, v in out.items() if k != "recipe"}}


_DEIT = dict(base_lr=5e-4, lr_batch=512, weight_decay=0.05, epochs=300, warmup_epochs=5, warmup_lr=1e-6,
             min_lr=1e-5, smoothing=0.1, mixup=0.8, cutmix=1.0, mixup_switch_prob=0.5, drop_path=0.1,
             aa=RAND_AUGMENT, reprob=0.25, repeated_aug=3, layer_decay=None, batch_size=1024, eval_crop_pct=0.875)
_MAE = dict(_DEIT, base_lr=5e-4, lr_batch=256, epochs=100, warmup_lr=0.0, min_lr=1e-6, repeated_aug=1,
            layer_decay=0.65, schedule="step")
#: MAE's published ViT-L / ViT-H fine-tuning
_MAE_SIZES = {"vit_large": dict(base_lr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.2),
              "vit_huge": dict(base_lr=1e-3, layer_decay=0.75, epochs=50, drop_path=0.3)}
_TRANSFER = dict(_DEIT, base_lr=3e-4, epochs=100, warmup_epochs=3, aa=None, reprob=0.0, repeated_aug=1,
                 train_scale=(0.05, 1.0),
                 interpolation="bilinear", color_jitter=None)
RECIPES: dict[str, dict[str, Any]] = {
    "deit": _DEIT,
    "mae": _MAE,
    "cifar10": dict(_TRANSFER, weight_decay=0.1, mixup=0.8, cutmix=1.0, drop_path=0.1),
    "cifar100": dict(_TRANSFER, weight_decay=0.1, mixup=0.5, cutmix=1.0, drop_path=0.1),
    "flowers": dict(_TRANSFER, weight_decay=0.3, mixup=0.0, cutmix=0.0, drop_path=0.1),
    "pets": dict(_TRANSFER, weight_decay=0.1, mixup=0.8, cutmix=0.0, drop_path=0.0),
}
#: the recipe's flags (argparse dests) and the recipe fields they override
OVERRIDES = ("lr", "crop_min", "weight_decay", "epochs", "warmup_epochs", "warmup_lr", "min_lr", "smoothing", "mixup",
             "cutmix", "mixup_switch_prob", "drop_path", "aa", "reprob", "repeated_aug", "layer_decay", "batch_size",
             "eval_crop_pct")


def resolve_recipe(name: str, arch: str, overrides: dict[str, Any]) -> Recipe:
    """The recipe `name` for `arch` with the given flag values (None: the recipe's). `lr` is the base lr."""
    if name not in RECIPES:
        raise ConfigError(f"--recipe {name!r}: known recipes are {', '.join(RECIPES)}")
    values = dict(RECIPES[name], recipe=name)
    if name == "mae":
        values.update(_MAE_SIZES.get(arch, {}))
    for key, value in overrides.items():
        if value is not None and key == "crop_min":
            values["train_scale"] = (value, 1.0)
        elif value is not None:
            values["base_lr" if key == "lr" else key] = value
    if arch in RESNET_ARCHS and overrides.get("drop_path") is None:
        values["drop_path"] = 0.0  # stochastic depth is for ViT blocks; a ResNet fine-tunes without it
    if values["aa"] in ("", "none", "None"):
        values["aa"] = None
    if values["layer_decay"] is not None and not 0 < values["layer_decay"] <= 1:
        raise ConfigError(f"--layer-decay {values['layer_decay']} must be in (0, 1]")
    if values["warmup_epochs"] >= values["epochs"] > 0 and values["warmup_epochs"]:
        raise ConfigError(f"--warmup-epochs {values['warmup_epochs']} must be below --epochs {values['epochs']}")
    return Recipe(**values)


# -- schedules --------------------------------------------------------------------------------------------
def deit_lr(epoch: float, r: Recipe) -> float:
    """DeiT's: timm's CosineLRScheduler(t_initial=epochs, lr_min=min_lr, warmup_t=warmup_epochs,
    warmup_lr_init=warmup_lr), which DeiT's main.py steps with the finished epoch's number after each epoch, so
    epoch e (0-based) trains at the scheduler's value for max(e - 1, 0)."""
    t = max(math.floor(epoch) - 1, 0)
    if t < r.warmup_epochs:
        return r.warmup_lr + t * (r.lr - r.warmup_lr) / r.warmup_epochs
    return r.min_lr + 0.5 * (r.lr - r.min_lr) * (1 + math.cos(math.pi * t / r.epochs))


def mae_lr(epoch: float, r: Recipe) -> float:
    """MAE's: linear warmup from 0 over `warmup_epochs`, then a half-cosine to `min_lr`, per iteration."""
    if epoch < r.warmup_epochs:
        return r.lr * epoch / r.warmup_epochs
    progress = (epoch - r.warmup_epochs) / (r.epochs - r.warmup_epochs)
    return r.min_lr + (r.lr - r.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def learning_rate(epoch: float, r: Recipe) -> float:
    return deit_lr(epoch, r) if r.schedule == "epoch" else mae_lr(epoch, r)
