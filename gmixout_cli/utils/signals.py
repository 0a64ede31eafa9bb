"""SIGINT / SIGTERM / SIGHUP during a run: finish the step, write a checkpoint, stop with one line.

Schedulers (Slurm, Kubernetes, `timeout`) signal every process of the job, DataLoader workers too.
Workers leave the decision to the main process (`worker_stop_signals`, their init function), which
stops at the next point where its state is whole:

- before training (set-up) and after export (evaluation) there is nothing to lose: stop at once;
- while training: the current step finishes, a checkpoint of it is written, then the run stops;
- while a checkpoint or the model is being written: the write finishes first, whatever arrives.

A second SIGINT while training stops at once (the last checkpoint stays as it was).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class StopNow(KeyboardInterrupt):
    """Raised in the main thread when a signal arrives where waiting for a step boundary is not needed."""


@dataclass
class StopFlag:
    requested: str = ""  # the first signal's name, once one arrived
    signum: int = 0
    immediate: bool = True  # set-up and evaluation: raise StopNow at once
    deferring: int = 0  # inside a write that must finish: only note the signal

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number (Ctrl-C: 130)."""
        return 128 + self.signum

    @contextlib.contextmanager
    def deferred(self) -> Iterator[None]:
        """A write that a signal must not cut short (checkpoint, export)."""
        self.deferring += 1
        try:
            yield
        finally:
            self.deferring -= 1


@contextlib.contextmanager
def stop_on_signals() -> Iterator[StopFlag]:
    """While active, the stop signals set `flag.requested` (and raise StopNow where `flag.immediate`)."""
    flag = StopFlag()
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum: int, frame: object) -> None:
        first = not flag.requested
        if first:
            flag.requested, flag.signum = signal.Signals(signum).name, signum
        if flag.deferring:
            return
        if flag.immediate or (not first and signum == signal.SIGINT):
            raise StopNow(flag.requested)

    previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def worker_stop_signals(worker_id: int = 0) -> None:
    """In a DataLoader worker: leave SIGINT and SIGHUP to the main process; on SIGTERM exit quietly.

    A worker ended by a signal makes torch raise in the main process at whatever line it is running,
    mid-step too; a worker that exits with status 0 is noticed only at the next batch fetch, between
    steps, where the main process, stopping on the same signal, needs no more batches. SIGTERM is not
    ignored: multiprocessing and torch end workers with it at shutdown.
    """
    for s in STOP_SIGNALS:
        signal.signal(s, _exit_quietly if s == signal.SIGTERM else signal.SIG_IGN)


def _exit_quietly(signum: int, frame: object) -> None:
    os._exit(0)


# The SIGCHLD handler each open worker_deaths_between_steps block found, outermost first.
_found_handlers: list[object] = []


@contextlib.contextmanager
def worker_deaths_between_steps() -> Iterator[None]:
    """While training: a loader worker that dies (out of memory, a stray kill) is noticed at the next fetch.

    torch's SIGCHLD handler raises in the main process at whatever line it is running when a worker is killed,
    mid-step too, where the model holds half an update and no checkpoint of it can be written. Without it the
    loader still notices the dead worker (it polls its workers' liveness while it waits for a batch), between
    steps, where the last step can be checkpointed. The handler is back once the outermost block ends: blocks
    nest (the whole training loop, and each epoch's batches after the loader's first `iter` installed torch's
    handler), so a worker killed between two epochs is noticed at the next fetch too.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _found_handlers.append(signal.signal(signal.SIGCHLD, signal.SIG_DFL))
    try:
        yield
    finally:
        found = _found_handlers.pop()
        if not _found_handlers:
            signal.signal(signal.SIGCHLD, found)  # type: ignore[arg-type]
        elif found not in (signal.SIG_DFL, None) and _found_handlers[0] in (signal.SIG_DFL, None):
            _found_handlers[0] = found  # torch's, installed inside the enclosing block: back when that one ends


def is_worker_loss(exc: BaseException) -> bool:
    """Whether torch raised this because a DataLoader worker died ("DataLoader worker (pid(s) 123) exited
    unexpectedly", "... is killed by signal: Killed.")."""
    return isinstance(exc, RuntimeError) and "DataLoader worker" in str(exc)


def worker_losses_named(batches: Iterable[T], wait_s: float = 3.0) -> Iterator[T]:
    """The batches; a batch lost in transit with the worker that made it raises torch's own worker-loss error.

    A batch's tensors reach the main process as file descriptors that the worker which made them serves: a worker
    killed after queueing a batch fails that transfer (connection reset or refused) a moment before torch's liveness
    poll can see it gone, and torch passes the transfer error on as it is. Whether a worker is gone decides: an
    error from a loader whose workers all live (a dataset's own OSError) is passed on unchanged.
    """
    it = iter(batches)
    while True:
        try:
            batch = next(it)
        except StopIteration:
            return
        except (OSError, EOFError) as exc:
            gone = _exited_workers(it, wait_s)
            if not gone:
                raise
            raise RuntimeError(f"DataLoader worker (pid(s) {', '.join(gone)}) exited unexpectedly") from exc
        yield batch


def _exited_workers(it: object, wait_s: float) -> list[str]:
    """The pids of the loader iterator's workers that have exited, waiting up to wait_s for an exit to show."""
    workers = getattr(it, "_workers", ())  # torch's liveness poll reads the same list
    deadline = time.monotonic() + wait_s
    while True:
        gone = [str(w.pid) for w in workers if not w.is_alive()]
        if gone or not workers or time.monotonic() > deadline:
            return gone
        time.sleep(0.05)
