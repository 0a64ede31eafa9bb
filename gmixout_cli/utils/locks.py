"""Exclusive locks on run folders: one process trains in a folder at a time.

An flock belongs to the open file, and forked children (DataLoader workers) share it: a worker
outliving its killed parent by a few seconds would keep the folder locked. Workers therefore close
their copies at start (`close_inherited_locks`), so the lock ends with the process that took it,
however that process ends (SIGKILL included).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

_HELD: set[int] = set()


class LockHeld(Exception):
    """Another process holds the lock; `owner` is the pid it wrote, if readable."""

    def __init__(self, owner: str) -> None:
        super().__init__(owner)
        self.owner = owner


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created if needed) for the block; raises LockHeld at once if taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise LockHeld(owner) from None
    _HELD.add(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        _HELD.discard(fd)
        os.close(fd)


def close_inherited_locks() -> None:
    """In a forked child: drop the parent's locks (the parent keeps them)."""
    for fd in list(_HELD):
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()
