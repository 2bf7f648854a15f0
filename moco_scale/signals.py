"""A stop signal outside the training loop. The loop's own handler (`dist.StopRequest`) saves and exits at the
next agreed step; before it is installed (imports, data scan, engine build, resume) and after it is gone (the
last writes), SIGTERM's default action would kill the process wherever it is. Here the signal raises
`Interrupted` instead: cleanups run (an atomic write removes its temporary file), and the command exits with
one line saying what was saved. Imports nothing heavy, so it guards torch's import too."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
_phase = "start-up"


class Interrupted(BaseException):
    """A stop signal outside the training loop (a BaseException, as KeyboardInterrupt, so no `except
    Exception` on the way swallows it)."""

    def __init__(self, signum: int, phase: str) -> None:
        self.signal_name, self.phase = signal.Signals(signum).name, phase
        self.exit_code = 128 + signum
        super().__init__(self.signal_name)

    def message(self) -> str:
        if self.phase == "start-up":
            return f"stopped by {self.signal_name} during start-up, before the first step: nothing was saved"
        return (f"stopped by {self.signal_name} after training, during the last writes: the checkpoints already "
                "saved are intact (--resume auto continues from the newest)")


def training_loop_started() -> None:
    """The loop owns the signals from here on; a signal after it is gone comes during the last writes."""
    global _phase
    _phase = "after training"


def _raise(signum: int, frame: object) -> None:
    raise Interrupted(signum, _phase)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """SIGTERM, SIGINT and SIGHUP raise `Interrupted` inside the block (the main thread only: Python delivers
    signals there); the previous handlers come back after it."""
    global _phase
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _phase = "start-up"
    previous = {sig: signal.signal(sig, _raise) for sig in SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
