"""SIGINT / SIGTERM during training: finish the step, write a checkpoint, stop."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass
class StopFlag:
    requested: str = ""


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While active, SIGINT/SIGTERM set `flag.requested` instead of killing the process mid-step; a second
    SIGINT interrupts at once."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        if flag.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag.requested = signal.Signals(signum).name

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
