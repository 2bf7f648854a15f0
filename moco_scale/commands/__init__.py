"""One module per `moco-scale` command: its argument parser and `main`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def run_evaluation(name: str, fn: Callable[[argparse.Namespace], Any], args: argparse.Namespace) -> int:
    """`fn(args)` for an evaluation command (lincls, knn): an unknown -a, or bad input (config, data,
    checkpoint), is one line and exit 2; the process group goes in every case."""
    from moco_scale.checkpoint.reference import CheckpointError
    from moco_scale.config import ConfigError
    from moco_scale.data import DataError
    from moco_scale.dist import shutdown
    from moco_scale.models import ARCHS
    from moco_scale.signals import Interrupted

    if args.arch is not None and args.arch not in ARCHS:
        print(f"moco-scale {name}: error: unknown architecture -a {args.arch}", file=sys.stderr)
        return 2
    leaving_at_once = False
    try:
        fn(args)
    except (ConfigError, DataError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"moco-scale {name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted:
        leaving_at_once = True  # no barrier on the way out: the other ranks may be anywhere
        raise
    finally:
        if not leaving_at_once:
            shutdown()
    return 0
