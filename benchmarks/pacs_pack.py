"""A small copy of PACS for machines reached through a size-limited transfer (the lent GPU machine: 64 MiB).

    python -m benchmarks.pacs_pack                         # ../shared/data/pacs -> .pacs128 (38 MiB at quality 80)
    python -m benchmarks.pacs --data .pacs128 ...          # then, there, as usual (at --image-size 128)

Every image is resized so that its shorter side is `--size` (bicubic, as the tool's eval transform) and
saved as JPEG under the same relative path, so the official split lists (copied verbatim) still
apply and every image is kept: at `--image-size` equal to `--size` the eval transform then has
nothing left to resize. Training crops come from the smaller image, so numbers are close to, not
identical with, runs on the original files; the JSON's `command` records which data a run used.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]


def pack(src: Path, dst: Path, size: int, quality: int) -> tuple[int, int]:
    """Resized copy of every image under src's domain folders, split lists copied; returns (images, bytes)."""
    if not (src / "splits").is_dir():
        raise SystemExit(f"pacs_pack: {src} has no splits/ folder: point --data at the PACS root")
    tmp = dst.with_name(dst.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src / "splits", tmp / "splits")
    count = total = 0
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src)
        if not path.is_file() or rel.parts[0] == "splits" or path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            continue
        out = tmp / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(path) as img:
            img = img.convert("RGB")
            scale = size / min(img.size)
            img = img.resize((max(size, round(img.width * scale)), max(size, round(img.height * scale))),
                             Image.BICUBIC)
            img.save(out, "JPEG", quality=quality)  # same name: the split lists name these files
        count += 1
        total += out.stat().st_size
    shutil.rmtree(dst, ignore_errors=True)
    tmp.rename(dst)  # a cut-off pack never looks complete
    return count, total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs_pack", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pacs")
    ap.add_argument("--out", type=Path, default=ROOT / ".pacs128")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--quality", type=int, default=80)
    args = ap.parse_args(argv)
    count, total = pack(args.data, args.out, args.size, args.quality)
    print(f"pacs_pack: {count} images, {total / 2**20:.1f} MiB -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
