"""What is wrong with a path argument, asked before any work: a file where a folder belongs, a folder where a
file belongs, a place that cannot be written. Each answer completes a sentence that starts with the flag and
the path ("--output-dir runs/x is a file, not a folder"); None when nothing is wrong that asking can tell."""

from __future__ import annotations

import os
from pathlib import Path


def folder_problem(path: str) -> str | None:
    """Why `path` cannot be read as a folder."""
    if not path:
        return "is empty: name a folder"
    if not os.path.exists(path):
        return "does not exist"
    return None if os.path.isdir(path) else "is a file, not a folder"


def file_problem(path: str) -> str | None:
    """Why `path` cannot be read as a file."""
    if not path:
        return "is empty: name a file"
    if not os.path.exists(path):
        return "does not exist"
    return "is a folder, not a file" if os.path.isdir(path) else None


def _writable(folder: Path) -> str | None:
    """Why nothing can be created in the existing `folder`."""
    if not folder.is_dir():
        return f"is under {folder}, which is a file, not a folder"
    if not os.access(folder, os.W_OK | os.X_OK):  # EROFS too, for root as well
        return f"cannot be written: {folder} is read-only for this user"
    return None


def writable_folder_problem(path: str) -> str | None:
    """Why a folder cannot be made (or written into) at `path`."""
    if not path:
        return "is empty: name a folder"
    target = Path(path)
    if target.exists() and not target.is_dir():
        return "is a file, not a folder"
    existing = next(p for p in (target, *target.parents) if p.exists())
    return _writable(existing)


def writable_file_problem(path: str) -> str | None:
    """Why a file cannot be written at `path`."""
    if not path:
        return "is empty: name a file"
    target = Path(path)
    if target.is_dir():
        return "is a folder; name the file to write"
    existing = next(p for p in target.parents if p.exists())
    return _writable(existing)
