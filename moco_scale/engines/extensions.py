"""DeepSpeed builds its ops (on the CPU, its shared-memory communication op) with torch's JIT extension
builder, in TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions). Before PyTorch's fix (pytorch#190543, July
2026; torch 2.11 on the GPU nodes has not got it) the builder holds a lock *file* whose mere existence blocks
(`FileBaton`): a launch killed during the build leaves it behind, and every later launch on the machine waits on
it forever without a word. torch 2.14.1 holds an OS lock the kernel releases (its lock file is harmless). The
scripts give .venv its own folder; this says what a launch waits on."""

from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path

from moco_scale.dist import say_if_still_waiting


def extensions_root() -> Path:
    from torch.utils.cpp_extension import get_default_build_root

    return Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())


def blocking_lock_files() -> bool:
    """Whether this torch's builder waits while a lock file exists (FileBaton), rather than on an OS lock."""
    from torch.utils import cpp_extension

    return "FileBaton" in vars(cpp_extension) and "FileLock" not in vars(cpp_extension)


def build_locks(root: Path) -> list[Path]:
    """The builder's lock files under `root` (ROOT/<python and cuda tag>/<op>/lock, or ROOT/<op>/lock)."""
    return sorted({*root.glob("*/*/lock"), *root.glob("*/lock")}) if root.is_dir() else []


def explain_build_wait(after_s: float = 60.0, root: Path | None = None, blocking: bool | None = None,
                       rank: int = 0) -> contextlib.AbstractContextManager[None]:
    """Around a call that may build an op: if it has not returned after `after_s` and lock files that block this
    torch's builder exist, name them once, with what to do."""

    def describe() -> str | None:
        if not (blocking_lock_files() if blocking is None else blocking):
            return None
        locks = build_locks(root or extensions_root())
        dated = ", ".join(f"{p} (from {time.strftime('%Y-%m-%d %H:%M', time.localtime(p.stat().st_mtime))})"
                          for p in locks)
        return None if not locks else (
            f"moco-scale: rank {rank}: DeepSpeed's op build has waited {after_s:.0f} s on the lock file(s) {dated}. "
            "A launch killed while building leaves one behind, and torch then waits forever: if no other launch on "
            "this machine is building, stop this one, remove the file(s) and launch again (or set "
            "TORCH_EXTENSIONS_DIR to a fresh folder)")

    return say_if_still_waiting(after_s, describe)
