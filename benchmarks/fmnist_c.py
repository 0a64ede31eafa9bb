"""Fashion-MNIST-C: a corruption benchmark built from registry data, as ImageFolder domains for gmixout.

    python -m benchmarks.fmnist_c                            # -> data/fmnist_c: 32,000 PNGs, 40 MiB, 1 min on 2 cores
    python -m benchmarks.fmnist_c --out /tmp/fmnist_c --severity 5 --corruptions fog,contrast
    gmixout finetune --data data/fmnist_c/clean              # every sibling is an out-of-domain test set
    gmixout compare --data data/fmnist_c/clean --methods full,gmixout

Source: Fashion-MNIST as shipped by Debian's `dataset-fashion-mnist` (apt-get install dataset-fashion-mnist;
the idx .gz files in /usr/share/datasets/fashion-mnist, read with numpy, sha256 recorded). Corruptions:
PyPI `imagecorruptions-imaug` (pip install imagecorruptions-imaug==1.1.5): the ImageNet-C corruption code of
Hendrycks & Dietterich (2019), as packaged by `imagecorruptions`, in the imaug fork that runs on current numpy
and scikit-image.

What it builds under --out, every image a 32x32 RGB PNG (the 28x28 grey image resized bicubic, grey copied
to three channels), class folders t_shirt_top, trouser, pullover, dress, coat, sandal, shirt, sneaker, bag,
ankle_boot in every domain:

- `clean/`: the first --train-per-class images of each class of the TRAIN file (default 600: 6,000 images);
- `test_clean/`: the first --test-per-class images of each class of the TEST file (default 200: 2,000);
- `<corruption>/`: the same test images, each corrupted at --severity (1-5, default 3), one domain per name in
  --corruptions (default: 12 of the 15 ImageNet-C corruptions; glass_blur, snow and frost are left out).

File names are the image's index in its source file (`00042.png`), so test_clean/x/00042.png and
fog/x/00042.png are the same picture. Protocol, as CIFAR-10-C and ImageNet-C: train on `clean` (gmixout holds
out its own validation split from it for the in-domain score), then report top-1 on `test_clean` (the
uncorrupted test images) and on each corruption domain, and their mean over the corruptions.

Unlike CIFAR-10-C, whose corruptions were re-tuned for 32 px, imagecorruptions applies the ImageNet-C
parameters (made for 224 px) to any size: at 32 px the blurs are strong (defocus_blur at severity 3 leaves
mostly the silhouette), elastic_transform smooths its displacement field over 1% of the side (0.3 px), so it
scatters pixels rather than warping the garment (so it is not among the defaults), and the
noises draw each RGB channel apart, so the grey
images get coloured noise. Lower --severity softens all of them.

Exact rebuilds: numpy's global RNG (which imagecorruptions draws from) is seeded per (corruption, image index)
before every call, and the corruptions with their own `seed` argument (impulse_noise, glass_blur) get the same
seed; so a rerun writes the same bytes, with any --workers. Each domain is written into a hidden
`.<domain>.partial` folder (gmixout skips hidden folders) and renamed when complete; `manifest.json` (source
files and their sha256, counts per domain, severity, corruptions, library versions, command) is written last.
A rerun whose manifest has the same settings prints that the data is complete and writes nothing.
"""

from __future__ import annotations

import argparse
import datetime
import gzip
import hashlib
import importlib.metadata
import inspect
import json
import multiprocessing
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.bench_common import ROOT, command_line, git_head

SOURCE_DIR = Path("/usr/share/datasets/fashion-mnist")
SOURCE_FILES = {
    "train_images": "train-images-idx3-ubyte.gz", "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz", "test_labels": "t10k-labels-idx1-ubyte.gz",
}
APT_HINT = "apt-get install dataset-fashion-mnist"
PIP_HINT = "pip install imagecorruptions-imaug==1.1.5"
CLASSES = ("t_shirt_top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle_boot")
DEFAULT_CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "motion_blur", "zoom_blur",
                       "contrast", "brightness", "pixelate", "jpeg_compression", "fog")  # not elastic_transform: below
SIZE = 32
MANIFEST = "manifest.json"
FORMAT = 1  # bump when the images written for the same settings change
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
              0x0E: np.dtype(">f8")}


class BuildError(Exception):
    """A one-line reason to stop (exit code 2), printed without a traceback."""


def read_idx(path: Path) -> np.ndarray:
    """The array in a gzip-compressed idx file (the MNIST format: magic, big-endian dims, raw data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise BuildError(f"{path} is not an idx file (bad magic number)")
    ndim = raw[3]
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = np.dtype(IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise BuildError(f"{path} is truncated: {len(raw) - offset} data bytes for shape {dims}")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def sha256(path: Path) -> str:
    """The file's sha256, hex."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_source(source: Path) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """(arrays by SOURCE_FILES key, {file name: sha256 and size}); checks shapes and labels."""
    if not source.is_dir():
        raise BuildError(f"no Fashion-MNIST at {source}: {APT_HINT} (Debian/Ubuntu), or --source DIR of the idx files")
    missing = [name for name in SOURCE_FILES.values() if not (source / name).is_file()]
    if missing:
        raise BuildError(f"{source} lacks {', '.join(missing)}: reinstall it ({APT_HINT} --reinstall)")
    arrays = {key: read_idx(source / name) for key, name in SOURCE_FILES.items()}
    for split in ("train", "test"):
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (len(images),):
            raise BuildError(f"{split} files hold images {images.shape} and labels {labels.shape}, not N x 28 x 28")
        if labels.min() < 0 or labels.max() >= len(CLASSES):
            raise BuildError(f"{split} labels outside 0..{len(CLASSES) - 1}")
    files = {name: {"sha256": sha256(source / name), "bytes": (source / name).stat().st_size}
             for name in SOURCE_FILES.values()}
    return arrays, files


def first_per_class(labels: np.ndarray, per_class: int, split: str) -> np.ndarray:
    """Indices of the first `per_class` images of every class in file order, ascending."""
    chosen = []
    for c, name in enumerate(CLASSES):
        found = np.flatnonzero(labels == c)
        if len(found) < per_class:
            raise BuildError(f"the {split} file has {len(found)} {name} images, fewer than {per_class} per class")
        chosen.append(found[:per_class])
    return np.sort(np.concatenate(chosen))


def to_rgb32(image: np.ndarray) -> np.ndarray:
    """A 28x28 grey uint8 image as SIZE x SIZE x 3 uint8 (bicubic resize, grey copied to three channels)."""
    return np.asarray(Image.fromarray(image).resize((SIZE, SIZE), Image.Resampling.BICUBIC).convert("RGB"))


def seed_for(corruption: str, index: int) -> int:
    """The RNG seed of one image under one corruption: stable across runs, processes and Python versions."""
    return int.from_bytes(hashlib.sha256(f"{corruption}/{index}".encode()).digest()[:4], "little")


def import_corruptions() -> tuple[Callable[..., Any], list[str], str]:
    """(imagecorruptions.corrupt, every corruption name, the imagecorruptions-imaug version)."""
    try:
        import imagecorruptions
    except ImportError:
        raise BuildError(f"imagecorruptions is not installed: {PIP_HINT}") from None
    try:
        version = importlib.metadata.version("imagecorruptions-imaug")
    except importlib.metadata.PackageNotFoundError:
        raise BuildError(f"the imagecorruptions module found is not imagecorruptions-imaug: pip uninstall "
                         f"imagecorruptions && {PIP_HINT}") from None
    return imagecorruptions.corrupt, list(imagecorruptions.get_corruption_names("all")), version


def _takes_seed(name: str) -> bool:
    """Whether the corruption function has its own `seed` argument (else it draws from unseeded generators)."""
    import imagecorruptions

    return "seed" in inspect.signature(imagecorruptions.corruption_dict[name]).parameters


def corrupt_image(image: np.ndarray, name: str, severity: int, seed: int) -> np.ndarray:
    """`image` (SIZE x SIZE x 3 uint8) corrupted, seeded, back as SIZE x SIZE x 3 uint8."""
    from imagecorruptions import corrupt

    np.random.seed(seed)
    kwargs = {"seed": seed} if _takes_seed(name) else {}
    out = np.asarray(corrupt(image, corruption_name=name, severity=severity, **kwargs))
    if out.dtype != np.uint8:
        out = np.clip(np.rint(out.astype(np.float64)), 0, 255).astype(np.uint8)
    if out.ndim == 2:
        out = np.stack([out] * 3, axis=-1)
    if out.shape != image.shape:
        out = np.asarray(Image.fromarray(out[..., :3]).resize((SIZE, SIZE), Image.Resampling.BICUBIC))
    return out


# The images a pool worker reads: (split -> (indices, labels, SIZE x SIZE x 3 images)), set once per process.
_IMAGES: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}


def _init_worker(images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]], single_thread: bool) -> None:
    _IMAGES.update(images)
    if single_thread:  # one process per core: OpenCV's own threads would only compete with the other worker
        import cv2

        cv2.setNumThreads(1)


def write_domain(task: tuple[Path, str, str, str | None, int]) -> tuple[str, int, float]:
    """Write one domain into `.<domain>.partial` and rename it into place; returns (domain, images, seconds).

    task = (out, domain, split, corruption or None, severity)."""
    out, domain, split, corruption, severity = task
    start = time.perf_counter()
    indices, labels, images = _IMAGES[split]
    tmp = out / f".{domain}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    for name in CLASSES:
        (tmp / name).mkdir(parents=True)
    for index, label, image in zip(indices, labels, images, strict=True):
        if corruption is not None:
            image = corrupt_image(image, corruption, severity, seed_for(corruption, int(index)))
        Image.fromarray(image).save(tmp / CLASSES[int(label)] / f"{int(index):05d}.png")
    shutil.rmtree(out / domain, ignore_errors=True)
    os.rename(tmp, out / domain)
    return domain, len(indices), time.perf_counter() - start


def read_manifest(out: Path) -> dict[str, Any] | None:
    """The manifest under `out`, or None when absent or unreadable."""
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def prepare_out(out: Path, domains: list[str], old: dict[str, Any] | None) -> None:
    """Make `out` ready for a (re)build: no manifest, no stale domains; refuse folders we did not write."""
    out.mkdir(parents=True, exist_ok=True)
    ours = set(domains) | set((old or {}).get("domains", {}))
    foreign = sorted(e.name for e in os.scandir(out)
                     if e.is_dir() and not e.name.startswith(".") and e.name not in ours)
    if foreign:
        raise BuildError(f"{out} holds folders this script did not write ({', '.join(foreign)}); gmixout would take "
                         "them for test domains: remove them or choose another --out")
    (out / MANIFEST).unlink(missing_ok=True)  # from here on the folder does not look complete
    for name in ours - set(domains):  # domains of an earlier build that this one does not have
        shutil.rmtree(out / name, ignore_errors=True)
    for entry in os.scandir(out):
        if entry.name.startswith(".") and entry.name.endswith(".partial"):
            shutil.rmtree(entry.path, ignore_errors=True)


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries whose code shapes the written images."""
    found: dict[str, str | None] = {"python": sys.version.split()[0]}
    for dist in ("imagecorruptions-imaug", "numpy", "pillow", "scipy", "scikit-image", "opencv-python", "numba"):
        try:
            found[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            found[dist] = None
    return found


def build(args: argparse.Namespace, argv: list[str]) -> int:
    """Build (or confirm) the data set described by the parsed arguments."""
    corruptions = list(dict.fromkeys(c.strip() for c in args.corruptions.split(",") if c.strip()))
    if not corruptions:
        raise BuildError("--corruptions is empty: name at least one corruption")
    _, valid, version = import_corruptions()
    unknown = [c for c in corruptions if c not in valid]
    if unknown:
        raise BuildError(f"unknown corruption {', '.join(unknown)}: valid names are {','.join(valid)}")
    if set(corruptions) & {"clean", "test_clean"}:
        raise BuildError("a corruption cannot be named clean or test_clean")
    arrays, files = load_source(args.source)
    out: Path = args.out
    settings = {"format": FORMAT, "source_sha256": {name: f["sha256"] for name, f in files.items()},
                "train_per_class": args.train_per_class, "test_per_class": args.test_per_class,
                "severity": args.severity, "corruptions": corruptions, "imagecorruptions": version, "image_size": SIZE}
    domains = ["clean", "test_clean", *corruptions]
    old = read_manifest(out)
    if old is not None and old.get("settings") == settings and all((out / d).is_dir() for d in domains):
        print(f"fmnist_c: {out} is complete ({old.get('images')} images in {len(domains)} domains); nothing to do")
        return 0

    start = time.perf_counter()
    split_images: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    for split, per_class in (("train", args.train_per_class), ("test", args.test_per_class)):
        idx = first_per_class(arrays[f"{split}_labels"], per_class, split)
        images = np.stack([to_rgb32(img) for img in arrays[f"{split}_images"][idx]])
        split_images[split] = (idx, arrays[f"{split}_labels"][idx].astype(np.int64), images)
    probe = split_images["test"][2][0]
    for name in corruptions:  # every corruption once on a real image before anything is written
        try:
            result = corrupt_image(probe, name, args.severity, seed_for(name, 0))
        except Exception as exc:  # any failure of the library, one line
            raise BuildError(f"corruption {name} fails on a {SIZE}x{SIZE} RGB image: {type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
        if result.shape != (SIZE, SIZE, 3):
            raise BuildError(f"corruption {name} returns shape {result.shape}")

    prepare_out(out, domains, old)
    tasks = [(out, "clean", "train", None, args.severity), (out, "test_clean", "test", None, args.severity)]
    tasks += [(out, name, "test", name, args.severity) for name in corruptions]
    counts: dict[str, int] = {}
    print(f"fmnist_c: writing {len(domains)} domains to {out} with {args.workers} worker(s)")

    def report(result: tuple[str, int, float]) -> None:
        domain, count, seconds = result
        counts[domain] = count
        print(f"  {domain:<18} {count:>6} images {seconds:7.1f} s", flush=True)

    if args.workers == 1:
        _init_worker(split_images, single_thread=False)
        for task in tasks:
            report(write_domain(task))
    else:
        ctx = multiprocessing.get_context()
        with ctx.Pool(args.workers, initializer=_init_worker, initargs=(split_images, True)) as pool:
            for result in pool.imap_unordered(write_domain, tasks):
                report(result)
    seconds = time.perf_counter() - start

    manifest = {
        "benchmark": "fmnist_c", "settings": settings,
        "source": {"dir": str(args.source), "package": "dataset-fashion-mnist (Debian)", "files": files},
        "classes": list(CLASSES), "image_size": SIZE, "severity": args.severity, "corruptions": corruptions,
        "imagecorruptions": version, "domains": {d: {"split": "train" if d == "clean" else "test", "count": counts[d],
                                                      "corruption": d if d in corruptions else None} for d in domains},
        "images": sum(counts.values()), "build_seconds": round(seconds, 1), "workers": args.workers,
        "versions": library_versions(), "git_commit": git_head(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "command": command_line("fmnist_c", argv),
    }
    tmp = out / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    size = sum(p.stat().st_size for d in domains for p in (out / d).rglob("*.png"))
    print(f"fmnist_c: {manifest['images']} images, {size / 2**20:.1f} MiB in {seconds:.1f} s -> {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.fmnist_c", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "data" / "fmnist_c", help="root folder of the domains")
    ap.add_argument("--source", type=Path, default=SOURCE_DIR, help="folder of the Fashion-MNIST idx .gz files")
    ap.add_argument("--train-per-class", type=int, default=600, help="clean training images per class (max 6000)")
    ap.add_argument("--test-per-class", type=int, default=200, help="test images per class (max 1000)")
    ap.add_argument("--severity", type=int, default=3, choices=range(1, 6), metavar="1-5")
    ap.add_argument("--corruptions", default=",".join(DEFAULT_CORRUPTIONS), help="comma-separated corruption names")
    ap.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1), help="processes (default: 2)")
    args = ap.parse_args(argv)
    for flag in ("train_per_class", "test_per_class", "workers"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be at least 1")
    try:
        return build(args, sys.argv[1:] if argv is None else argv)
    except BuildError as exc:
        print(f"fmnist_c: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
