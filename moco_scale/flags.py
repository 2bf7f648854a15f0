"""Range-checked argparse types: every numeric flag of every command states the values it may take here, once,
so a value that makes no sense (a negative lr, a momentum above 1, -8 GPUs) stops the command before any process
starts, with argparse's one-line error naming the flag, the value and the range."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable


def _number(kind: type, low: float | None, high: float | None, low_open: bool, high_open: bool,
            what: str) -> Callable[[str], float]:
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}; "
                                             f"expected {what}") from None
        bad = (isinstance(value, float) and not math.isfinite(value)) or (
            low is not None and (value <= low if low_open else value < low)) or (
            high is not None and (value >= high if high_open else value > high))
        if bad:
            raise argparse.ArgumentTypeError(f"{text} is out of range: expected {what}")
        return value

    parse.__name__ = what  # argparse names the type in some messages
    return parse


positive_int = _number(int, 0, None, True, False, "an integer >= 1")
nonnegative_int = _number(int, 0, None, False, False, "an integer >= 0")
positive_float = _number(float, 0.0, None, True, False, "a number > 0")
nonnegative_float = _number(float, 0.0, None, False, False, "a number >= 0")
#: an EMA momentum or SGD momentum: 0 <= m <= 1 (1 freezes the momentum encoder)
unit_interval = _number(float, 0.0, 1.0, False, False, "a number in [0, 1]")
#: a share of something that must leave a rest: 0 <= x < 1 (plan's headroom)
fraction = _number(float, 0.0, 1.0, False, True, "a number in [0, 1)")
#: RandomResizedCrop's smallest area share: 0 < x <= 1
crop_fraction = _number(float, 0.0, 1.0, True, False, "a number in (0, 1]")
