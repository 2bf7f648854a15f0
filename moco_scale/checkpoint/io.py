"""Reading and writing single files safely: the one `torch.load` every module uses, and writes that a
crash or a full disk cannot leave half done. A leaf module: it imports nothing of moco-scale."""

from __future__ import annotations

import contextlib
import errno
import os
import pickle
from pathlib import Path
from typing import Any

import torch

_EXPECTED = "expected a file written by moco-scale or the MoCo v3 reference (torch.save of a dict)"


class NoSpaceError(OSError):
    """The disk filled up during a save; the message names the file and what is still intact."""


def is_disk_full(e: BaseException) -> bool:
    """ENOSPC (or EDQUOT) as an OSError, or as torch's serializer reports it (a RuntimeError from
    inline_container.cc whose text carries the errno message)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    return "No space left on device" in text or "Disk quota exceeded" in text or (
        "inline_container" in text and "file write failed" in text)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save to a temporary name in the same folder, then rename: a crash leaves the old file, a full disk
    leaves no partial file behind."""
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        open(tmp, "wb").close()  # a folder that cannot be written fails here, as an OSError with its errno
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(OSError):  # the cleanup's own error must not hide the real one
            Path(tmp).unlink(missing_ok=True)
        if is_disk_full(e):
            kept = f"; the previous {path} is intact" if os.path.exists(path) else ""
            raise NoSpaceError(errno.ENOSPC, f"no space left on device while writing {path}{kept}") from None
        if isinstance(e, OSError):
            error = OSError(f"cannot write {path}: {e.strerror or e}")
            error.errno = e.errno
            raise error from e
        raise


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def load_checkpoint(path: str) -> Any:
    """Load a checkpoint file safely (weights_only), with an error that names the file and what it is not."""
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {path} is a folder where a checkpoint file was expected")
    if os.path.isfile(path):
        with open(path, "rb") as f:
            head = f.read(4)
        if head[:2] != b"PK" and head[:1] != b"\x80":  # neither torch's zip format nor a legacy pickle
            raise ValueError(f"{path} is not a checkpoint: not a torch.save file (it starts with {head!r}); "
                             f"{_EXPECTED}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"checkpoint {path} does not exist") from e
    except pickle.UnpicklingError as e:
        # torch's own advice (re-run with weights_only=False) would run whatever code the file holds: not given
        raise ValueError(f"{path} is not a checkpoint moco-scale reads: it holds objects other than tensors, numbers "
                         f"and plain containers, and moco-scale loads only those (weights_only); {_EXPECTED}") from e
    except Exception as e:
        raise ValueError(f"{path} is not a checkpoint: torch.load cannot read it ({type(e).__name__}: it is "
                         f"truncated or damaged); {_EXPECTED}") from e
