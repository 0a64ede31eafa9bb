"""A dataset over (path, label) items and a seeded DataLoader factory."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset

from gmixout_cli.data.folders import Item
from gmixout_cli.data.transforms import to_rgb
from gmixout_cli.errors import UserError
from gmixout_cli.utils.locks import close_inherited_locks
from gmixout_cli.utils.signals import worker_losses_named, worker_stop_signals


class ImageReadError(UserError):
    """An image file that cannot be decoded; still a one-line `UserError` when raised in a worker.

    A DataLoader worker re-raises exceptions in the main process as `type(exc)(text)`, where the
    text is 'Caught ... in DataLoader worker process N. Original Traceback ...' ending in
    '<module>.ImageReadError: <message>'. The constructor recovers that message so the user still
    sees one line, not a flattened traceback.
    """

    def __init__(self, message: str) -> None:
        marker = f"{type(self).__name__}: "
        if "in DataLoader worker process" in message and marker in message:
            message = message.rsplit(marker, 1)[1]
        super().__init__(message)


def _reason(exc: Exception) -> str:
    """A short cause: PIL's own messages repeat the file object, errno errors carry strerror."""
    if isinstance(exc, UnidentifiedImageError):
        return "not a recognisable image (corrupt, or not the format its extension says)"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc).strip() or type(exc).__name__


def read_image(path: Path) -> Image.Image:
    """Decode `path` fully into an 8-bit RGB PIL image.

    Raises:
        ImageReadError: when the file is missing, unreadable, not an image, corrupt or truncated.
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()  # decode now, while the file is open: truncation surfaces here
        return to_rgb(image)
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error...
        reason = _reason(exc)
        raise ImageReadError(f"cannot read image {path}: {reason}; remove or replace the file") from None


class ImageListDataset(Dataset):
    """(tensor, label) pairs from (path, label) items."""

    def __init__(self, items: list[Item], transform: Callable) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        path, label = self.items[index]
        return self.transform(read_image(path)), int(label)


def init_worker(worker_id: int) -> None:
    """In each worker: leave stop signals to the main process (it checkpoints the step it is in), and
    seed numpy and `random` from the worker's torch seed (itself derived from the loader's generator), so
    any augmentation that uses them is reproducible too."""
    worker_stop_signals()
    close_inherited_locks()  # the run folder's lock ends with the main process
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)



class Loader(DataLoader):
    """A DataLoader whose iteration reports a batch lost in transit with its killed worker as the worker loss it is
    (`worker_losses_named`), wherever its batches are read."""

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return worker_losses_named(super().__iter__())  # eager: the workers start (and torch's handler) here


def make_loader(
    items: list[Item],
    transform: Callable,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int,
    drop_last: bool = False,
) -> DataLoader:
    """A DataLoader whose order (and worker augmentation seeds) depend only on `seed`.

    Raises:
        ValueError: on an empty item list (callers validate their splits first).
    """
    if not items:
        raise ValueError("make_loader needs at least one item")
    generator = torch.Generator()
    generator.manual_seed(seed)
    return Loader(
        ImageListDataset(items, transform),
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=generator,
        worker_init_fn=init_worker if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=torch.cuda.is_available(),
        drop_last=drop_last,
    )
