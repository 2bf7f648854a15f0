"""The training core every command stands on: typed run configs, the run folder and the Trainer."""

from moco_scale.train.config import ModelConfig, RunConfig
from moco_scale.train.trainer import Trainer

__all__ = ["ModelConfig", "RunConfig", "Trainer"]
