"""The engine JSON as a typed config: `"engine": "ddp" | "fsdp"` in moco-scale's small schema, or a genuine
DeepSpeed config (recognised by its DeepSpeed keys). A config knows its engine: the questions asked before an
engine exists (checkpoint layout, label, precision asked for, whether it resumes a folder) are its methods,
and `build` makes the engine."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from moco_scale.config import ConfigError, from_mapping, load_json

if TYPE_CHECKING:
    from moco_scale.dist import DistContext
    from moco_scale.engines.base import Engine
    from moco_scale.models.parts import TrainModule
    from moco_scale.optim import OptimizerSpec

Precision = Literal["auto", "fp32", "bf16", "fp16"]
#: the layout DDP and FSDP share (torch.distributed.checkpoint names every tensor whatever the sharding)
DCP_LAYOUT = "torch.distributed.checkpoint"


@dataclass(frozen=True)
class EngineConfig:
    """What every engine reads: per-block activation checkpointing (every k-th block, 0 off), backbone chunking
    (K crops at a time, 0 off) and per-block torch.compile."""

    engine: str
    activation_checkpointing: int = 0
    backbone_chunk: int = 0
    compile: bool = False

    #: a sharding engine needs a process group even in one plain process
    needs_process_group: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.activation_checkpointing < 0:
            raise ConfigError(f"activation_checkpointing must be 0 (off), 1 (every block) or k (every k-th), got "
                              f"{self.activation_checkpointing}")
        if self.backbone_chunk < 0:
            raise ConfigError(f"backbone_chunk must be 0 (off) or a positive number of crops, got "
                              f"{self.backbone_chunk}")

    @property
    def layout(self) -> str:
        """The checkpoint layout written into meta.json: engines that read each other's folders share one."""
        return DCP_LAYOUT

    @property
    def label(self) -> str:
        """How the run's first line names the engine."""
        return self.engine

    @property
    def requested_precision(self) -> str:
        """What the config asks for ("auto", "fp32", "bf16", "fp16"), before the device decides."""
        return getattr(self, "precision", "auto")

    def replace(self, **changes: Any) -> EngineConfig:
        """A copy with `changes` (flags that override the JSON, benchmarks that pin a key)."""
        return dataclasses.replace(self, **changes)

    def with_precision(self, precision: str) -> EngineConfig:
        """A copy asking for `precision` (benchmarks and checks that pin it)."""
        return self.replace(precision=precision)

    def resume_config(self, meta: dict[str, Any], source: Path) -> EngineConfig:
        """The config that resumes the checkpoint folder `source` (its meta.json `meta`): this one, or a copy
        adjusted to read it; a ConfigError naming the way out where this engine cannot."""
        if meta["engine"] != self.layout:
            raise ConfigError(f"--resume {source} was written by {meta['engine']} and this run uses "
                              f"{self.layout}: their layouts differ. Consolidate it (moco-scale convert --to "
                              f"reference {source} full.pth.tar) and --resume full.pth.tar, or resume with the same "
                              "--engine-config")
        return self

    def check(self, plain_vit: bool, optimizer: str, precision: str) -> None:
        """The one check of a setup, shared by `pretrain` and `plan` (so that a plan's answer launches):
        chunking needs a ViT without BatchNorm in its backbone; an engine may refuse the optimizer."""
        if self.backbone_chunk and not plain_vit:
            raise ConfigError("--backbone-chunk needs a ViT: this backbone has BatchNorm, whose statistics would "
                              "be computed per chunk and change the result")

    @property
    def engine_class(self) -> type[Engine]:
        raise NotImplementedError

    def build(self, model: TrainModule, optimizer: OptimizerSpec, ctx: DistContext, **kwargs: Any) -> Engine:
        """The engine for `model` (on the meta device: materialised shard by shard; or a real one)."""
        return self.engine_class(model, optimizer, self, ctx, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class DDPConfig(EngineConfig):
    engine: Literal["ddp"] = "ddp"
    precision: Precision = "auto"
    bucket_cap_mb: float = 25.0
    find_unused_parameters: bool = False

    @property
    def engine_class(self) -> type[Engine]:
        from moco_scale.engines.ddp import DDPEngine

        return DDPEngine


@dataclass(frozen=True)
class FSDPConfig(EngineConfig):
    """FSDP2 full shard (`reshard_after_forward: true`) or gradient/optimizer sharding only (false)."""

    engine: Literal["fsdp"] = "fsdp"
    precision: Precision = "auto"
    reshard_after_forward: bool = True
    reduce_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    needs_process_group: ClassVar[bool] = True

    @property
    def label(self) -> str:
        return "fsdp full shard" if self.reshard_after_forward else "fsdp grad/optimizer shard"

    @property
    def engine_class(self) -> type[Engine]:
        from moco_scale.engines.fsdp import FSDPEngine

        return FSDPEngine


@dataclass(frozen=True)
class DeepSpeedConfig(EngineConfig):
    """A genuine DeepSpeed JSON (`deepspeed`, batch fields resolved) and moco-scale's own section's keys."""

    engine: Literal["deepspeed"] = "deepspeed"
    zero_stage: int = 0
    deepspeed: dict = field(default_factory=dict)
    needs_process_group: ClassVar[bool] = True

    @property
    def layout(self) -> str:
        return f"deepspeed ZeRO-{self.zero_stage}"  # partitions differ per stage

    @property
    def label(self) -> str:
        return self.layout

    @property
    def requested_precision(self) -> str:
        from moco_scale.engines.deepspeed_config import requested_precision

        return requested_precision(self.deepspeed)

    def with_precision(self, precision: str) -> DeepSpeedConfig:
        ds = copy.deepcopy(self.deepspeed)
        ds["bf16"] = {**ds.get("bf16", {}), "enabled": {"bf16": True, "auto": "auto"}.get(precision, False)}
        ds["fp16"] = {**ds.get("fp16", {}), "enabled": precision == "fp16"}
        return self.replace(deepspeed=ds)

    def resume_config(self, meta: dict[str, Any], source: Path) -> DeepSpeedConfig:
        """A universal checkpoint (convert --to universal) loads at any world size within its stage group."""
        if not meta.get("universal"):
            return super().resume_config(meta, source)
        saved_stage3, stage3 = meta["engine"].endswith("ZeRO-3"), self.zero_stage == 3
        if saved_stage3 != stage3:  # measured with deepspeed 0.19.8: its model files are named per stage group
            raise ConfigError(f"--resume {source} is a universal checkpoint of {meta['engine']}; DeepSpeed loads it "
                              f"into {'ZeRO-3' if saved_stage3 else 'ZeRO 1-2'} only, and this run uses "
                              f"ZeRO-{self.zero_stage}. Convert the original --to reference and --resume "
                              "that file instead (the optimizer starts fresh)")
        ds = copy.deepcopy(self.deepspeed)
        ds.setdefault("checkpoint", {})["load_universal"] = True
        return self.replace(deepspeed=ds)

    def check(self, plain_vit: bool, optimizer: str, precision: str) -> None:
        super().check(plain_vit, optimizer, precision)
        if optimizer == "lars" and (self.zero_stage > 0 or precision != "fp32"):
            raise ConfigError(f"LARS needs the norm of whole parameters, but ZeRO stage {self.zero_stage} "
                              f"({precision}) hands the optimizer flat partitions; use ZeRO stage 0 in fp32, "
                              "an FSDP config (ds_configs/fsdp.json), or --optimizer adamw")

    @property
    def engine_class(self) -> type[Engine]:
        from moco_scale.engines.deepspeed import DeepSpeedEngine

        return DeepSpeedEngine


def _looks_like_deepspeed(cfg: dict[str, Any]) -> bool:
    return "engine" not in cfg and any(k in cfg for k in ("zero_optimization", "train_batch_size",
                                                           "train_micro_batch_size_per_gpu", "bf16", "fp16"))


def load_engine_config(path: str | None, global_batch: int | None = None, world: int = 1) -> EngineConfig:
    """The engine JSON at `path` (DDP defaults when None), validated with every default filled in.

    A DeepSpeed JSON's "auto" batch fields are filled from `global_batch` and `world`.
    """
    if path is None:
        return DDPConfig()
    cfg = load_json(path)
    if _looks_like_deepspeed(cfg):
        from moco_scale.engines.deepspeed_config import resolve_deepspeed_config

        return resolve_deepspeed_config(cfg, path, global_batch, world)
    name = cfg.get("engine")
    if name == "fairscale":
        raise ConfigError(f"engine config {path}: fairscale is not supported: its FSDP moved into PyTorch as "
                          "torch.distributed.fsdp, which moco-scale uses; its last release (0.4.13, 2022) fails on "
                          "torch 2.x. Use ds_configs/fsdp.json (full shard) or ds_configs/fsdp_grad_op.json")
    configs = {"ddp": DDPConfig, "fsdp": FSDPConfig}
    if name not in configs:
        raise ConfigError(f"engine config {path}: key 'engine' must be ddp or fsdp (or the file a DeepSpeed "
                          f"config with a 'zero_optimization' section), got {name!r}")
    return from_mapping(configs[name], cfg, f"engine config {path}")
