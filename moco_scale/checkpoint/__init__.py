"""Checkpoints: the manager (folders, timelines, cadence, the trainer's and engine's state), resume, the
reference trainer's single-file format, and atomic file I/O."""

from moco_scale.checkpoint.io import NoSpaceError, atomic_save, atomic_write_text, load_checkpoint
from moco_scale.checkpoint.manager import FORMAT, META, CheckpointManager, find_latest, manifest, verify

__all__ = ["FORMAT", "META", "CheckpointManager", "NoSpaceError", "atomic_save", "atomic_write_text",
           "find_latest", "load_checkpoint", "manifest", "verify"]
