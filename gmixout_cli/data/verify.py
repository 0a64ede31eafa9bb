"""Decode every image once before training, so a bad file stops the run at the start, not hours in.

A file counts as readable exactly when `dataset.read_image` could use it: it opens as an image, its
pixel data decodes completely (`load()`: truncated JPEG/PNG/GIF/BMP/TIFF files fail here) and it
converts to RGB. Two shortcuts keep the pass cheap without weakening that:

- JPEGs decode in draft mode (libjpeg's DCT scaling, down to 1/8 per side). The whole entropy-coded
  stream is still read, so truncation is still caught, but a 12 MP photo decodes ~4x faster.
- The RGB conversion is skipped for full-size images in the modes `to_rgb` handles with plain
  array or PIL operations (RGB, L, P, RGBA, CMYK, 16-bit grey, ...); it runs on drafted JPEGs (now
  small, so cheap) and on any exotic mode, where the conversion itself could fail.

Decoding runs in a thread pool: PIL releases the GIL while decoding.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from gmixout_cli.data.dataset import ImageReadError, _reason
from gmixout_cli.data.folders import DomainData, Item
from gmixout_cli.data.transforms import to_rgb
from gmixout_cli.errors import UserError

MODES = ("error", "skip")
"""Values of `data.unreadable`."""

_PLAIN_MODES = frozenset(
    {"1", "L", "P", "RGB", "RGBA", "RGBX", "RGBa", "LA", "La", "PA", "CMYK", "YCbCr",
     "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
)
"""Modes whose RGB conversion in `to_rgb` cannot fail once the pixels have decoded."""


def image_problem(path: Path) -> str | None:
    """None when `path` decodes fully (and converts to RGB), else a short reason.

    The reason wording matches `read_image`'s errors (same `_reason`).
    """
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            drafted = image.draft(image.mode, (1, 1)) is not None  # JPEG only; a no-op elsewhere
            image.load()  # decode now, while the file is open: truncation surfaces here
        if drafted or image.mode not in _PLAIN_MODES:
            to_rgb(image)
        return None
    except Exception as exc:  # noqa: BLE001 - PIL raises OSError, ValueError, SyntaxError, struct.error...
        return " ".join(_reason(exc).split())


def _problems(paths: Sequence[Path], workers: int) -> list[str | None]:
    """`image_problem` of each path, in order, decoded by `max(1, workers)` threads."""
    if not paths:
        return []
    pool = ThreadPoolExecutor(max_workers=max(1, int(workers)))
    try:
        return list(pool.map(image_problem, paths))
    finally:  # on a stop signal, drop the queued images instead of decoding them all first
        pool.shutdown(wait=True, cancel_futures=True)


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'s' * (n != 1)}"


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"unreadable-image mode must be one of {MODES}, got {mode!r}")


def _resolve(
    items: list[Item], reasons: list[str | None], mode: str, what: str
) -> tuple[list[Item], list[tuple[Path, str]]]:
    """Apply `mode` to per-item decode results (see `verify_images`)."""
    bad = [(path, reason) for (path, _), reason in zip(items, reasons, strict=True) if reason is not None]
    if not bad:
        return list(items), []
    first_path, first_reason = bad[0]
    example = f"{first_path}: {first_reason}"
    if mode == "error":
        one = len(bad) == 1
        raise ImageReadError(
            f"cannot read {_plural(len(bad), 'image')} in {what} ({'' if one else 'e.g. '}{example}): "
            f"remove or replace {'it' if one else 'them'}, or set data.unreadable=skip to leave "
            f"{'it' if one else 'them'} out"
        )
    good = [item for item, reason in zip(items, reasons, strict=True) if reason is None]
    warnings.warn(
        f"skipped {_plural(len(bad), 'unreadable image')} in {what} (e.g. {example})", UserWarning, stacklevel=3
    )
    return good, bad


def verify_images(
    items: list[Item], mode: str, workers: int = 2, what: str = "training data"
) -> tuple[list[Item], list[tuple[Path, str]]]:
    """Decode every image once before training so that a bad file stops the run at the start, not hours in.

    Args:
        items: (path, label) pairs; their order is kept.
        mode: `data.unreadable`: "error" or "skip".
        workers: decoding threads (at least 1).
        what: names the image set in messages, e.g. "the training domain photo".

    Returns:
        (readable items in order, [(path, reason), ...] of the unreadable ones). With mode "error"
        the second list is always empty. With mode "skip" and any bad file, one `UserWarning`
        names their count and the first of them.

    Raises:
        ImageReadError: mode "error" and at least one file cannot be decoded (one line: the count,
            the first bad path and its reason, and the fix).
        ValueError: an unknown mode.
    """
    _check_mode(mode)
    reasons = _problems([path for path, _ in items], workers)
    return _resolve(items, reasons, mode, what)


def verify_domain_data(data: DomainData, mode: str, workers: int) -> tuple[DomainData, int]:
    """Verify the training domain's train and val splits in one pass.

    Returns:
        (the DomainData without unreadable items, the number left out). With mode "error" the count is 0.

    Raises:
        ImageReadError: mode "error" and some image is unreadable.
        UserError: mode "skip" left the train or val split empty, or a class without training images.
        ValueError: an unknown mode.
    """
    _check_mode(mode)
    items = list(data.train) + list(data.val)
    what = f"the training domain {data.domain}"
    reasons = _problems([path for path, _ in items], workers)
    _, bad = _resolve(items, reasons, mode, what)
    if not bad:
        return data, 0
    n_train = len(data.train)
    train = [item for item, reason in zip(items[:n_train], reasons[:n_train], strict=True) if reason is None]
    val = [item for item, reason in zip(items[n_train:], reasons[n_train:], strict=True) if reason is None]
    skipped = f"after skipping {_plural(len(bad), 'unreadable image')} (e.g. {bad[0][0]}: {bad[0][1]})"
    fix = "remove or replace the unreadable files"
    for split, kept, original in (("training", train, data.train), ("held-out", val, data.val)):
        if original and not kept:
            raise UserError(f"no readable {split} images are left in {what} {skipped}: {fix}")
    present = {label for _, label in train}
    lost = [name for index, name in enumerate(data.classes) if index not in present
            and any(label == index for _, label in data.train)]
    if lost:
        also = f" (nor do classes {', '.join(lost[1:])})" if len(lost) > 1 else ""
        raise UserError(f"class {lost[0]} of {what} has no readable training images left {skipped}{also}: {fix}")
    return dataclasses.replace(data, train=train, val=val), len(bad)
