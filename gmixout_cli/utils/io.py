"""Atomic writes: every output goes to a temporary file in the same folder, then is renamed into place."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

TMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path`, on failure it is removed.

    The data is flushed to the disk before the rename (and the rename after it), so a power loss or a
    killed machine leaves the old file or the new one, never an empty or partial one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the file itself was synced
        pass
    finally:
        os.close(fd)


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary files of writes that a killed process never finished (`.NAME.XXXX.tmp`)."""
    stale = [p for p in Path(folder).glob(f".*{TMP_SUFFIX}") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_text(path: Path, text: str) -> None:
    """Atomically write a text file."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write pretty JSON."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    """Atomically write YAML (block style, key order kept)."""
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def append_jsonl(path: Path, obj: Any) -> None:
    """Append one JSON line (a log: a torn last line is the only possible loss)."""
    with open(path, "a") as f:
        f.write(json.dumps(obj) + "\n")


def save_safetensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write a safetensors file whose bytes depend only on its content.

    The safetensors writer orders metadata keys by a hash map, differently in every process; the header
    is rewritten with sorted metadata keys (same length, same JSON) so equal models give equal files.
    """
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if metadata:
            _sort_metadata_in_place(tmp)


def _sort_metadata_in_place(path: Path) -> None:
    with open(path, "r+b") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        data = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(data) > size:  # cannot happen for a reordering; keep the valid original rather than risk it
            return
        f.seek(8)
        f.write(data + b" " * (size - len(data)))  # safetensors pads its header with spaces too
