"""The train / held-out split of the training domain: split lists when present, else seeded random.

Split lists follow the PACS format: one `<domain>/<class>/<file> <label>` per line, paths relative
to ROOT, labels 1-based in sorted class-folder order. Blank lines and lines starting with '#' are
skipped. They are looked up in ROOT/splits (`data.splits=auto`) or in the folder `data.splits`
names, as `<domain>_train*.txt` plus `<domain>_crossval*.txt` (or, without one, `<domain>_val*.txt`).
`<domain>_test*.txt` lists are read only to account for images: in PACS the test list is
train + crossval, so the crossval list is the held-out split.
"""

from __future__ import annotations

import glob
import warnings
from pathlib import Path, PurePosixPath

import numpy as np

from gmixout_cli.config.schema import DataConfig
from gmixout_cli.errors import UserError

_Item = tuple[Path, int]


def split_domain(
    root: Path, domain: str, images: dict[str, list[Path]], cfg: DataConfig
) -> tuple[list[_Item], list[_Item], str]:
    """(train, val, split_source) for a scanned domain, following `cfg.splits`.

    Raises:
        UserError: on missing, ambiguous or inconsistent split lists.
    """
    mode = cfg.splits.strip()
    if mode == "none":
        return random_split(images, cfg.val_fraction, cfg.split_seed)
    if mode == "auto":
        folder = root / "splits"
        lists = find_split_lists(folder, domain, required=False) if folder.is_dir() else None
    else:
        folder = Path(mode).expanduser()
        if not folder.is_dir():
            raise UserError(
                f"data.splits folder {folder} does not exist: give a folder of split lists, 'auto' or 'none'"
            )
        lists = find_split_lists(folder, domain, required=True)
    if lists is None:
        return random_split(images, cfg.val_fraction, cfg.split_seed)
    return read_split_lists(root, domain, images, *lists)


def _one(folder: Path, pattern: str) -> Path | None:
    """The single file in `folder` matching `pattern`; None if none; UserError if several."""
    found = sorted(folder.glob(pattern))
    if len(found) > 1:
        names = ", ".join(p.name for p in found)
        raise UserError(f"several split lists match {folder / pattern} ({names}): keep one or set data.splits=none")
    return found[0] if found else None


def find_split_lists(folder: Path, domain: str, required: bool) -> tuple[Path, Path, list[Path]] | None:
    """(train list, val list, test lists) of `domain` in `folder`, or None when it has neither list.

    A train list without a val list (or the reverse) is an error rather than a silent random split.
    """
    stem = glob.escape(domain)
    train = _one(folder, f"{stem}_train*.txt")
    val = _one(folder, f"{stem}_crossval*.txt") or _one(folder, f"{stem}_val*.txt")
    if train is None and val is None and not required:
        return None
    if train is None and val is None:
        raise UserError(
            f"no split lists for {domain} in {folder} (expected {domain}_train*.txt and {domain}_crossval*.txt): "
            "add them, or set data.splits=auto or none"
        )
    if train is None or val is None:
        missing = f"{domain}_train*.txt" if train is None else f"{domain}_crossval*.txt or {domain}_val*.txt"
        raise UserError(
            f"split lists for {domain} in {folder} are incomplete (no {missing}): add it or set data.splits=none"
        )
    tests = sorted(folder.glob(f"{stem}_test*.txt"))
    return train, val, tests


def _check_labels(list_path: Path, classes: list[str], rows: list[tuple[int, int, int]]) -> None:
    """Check the label column (1-based, sorted class-folder order) of (line, class index, label) rows.

    The class folder decides each label. The column is checked per class by majority: when most of
    a class's lines disagree with the folder order, the list follows another convention (0-based,
    another class order) and that is an error. A lone disagreeing line in an otherwise consistent
    class is a typo in the list - the official PACS art_painting_crossval_kfold.txt has one
    (`art_painting/dog/pic_225.jpg 0`; its test list says 1) - so it is reported as a warning and
    the folder's label is used.
    """
    by_class: dict[int, list[tuple[int, int]]] = {}
    for number, cls, label in rows:
        by_class.setdefault(cls, []).append((number, label))
    for cls, lines in by_class.items():
        wrong = [(number, label) for number, label in lines if label != cls + 1]
        if not wrong:
            continue
        number, label = wrong[0]
        if 2 * len(wrong) >= len(lines):
            raise UserError(
                f"line {number} of {list_path} gives label {label} for class '{classes[cls]}', but sorted class "
                f"folders make it {cls + 1} (labels are 1-based in sorted folder order): "
                "fix the list or the folder names"
            )
        for number, label in wrong:
            warnings.warn(
                f"line {number} of {list_path} gives label {label} for class '{classes[cls]}', unlike its other "
                f"{len(lines) - len(wrong)} '{classes[cls]}' lines ({cls + 1}); "
                f"using the class folder's label {cls + 1}",
                UserWarning,
                stacklevel=2,
            )


def _parse_list(
    list_path: Path, root: Path, domain: str, classes: list[str], known: set[Path], check_labels: bool
) -> list[_Item]:
    """Items of one split list, each checked against the scanned domain; labels come from folders."""
    try:
        lines = list_path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read split list {list_path}: {exc}; fix or remove the file") from None
    index = {name: i for i, name in enumerate(classes)}
    items: list[_Item] = []
    rows: list[tuple[int, int, int]] = []
    seen: dict[Path, int] = {}
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"line {number} of {list_path}"
        fields = line.rsplit(None, 1)  # rsplit: file names may contain spaces, labels never do
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise UserError(f"{where} is not '<domain>/<class>/<file> <label>': fix the line")
        rel = PurePosixPath(fields[0].replace("\\", "/"))
        if len(rel.parts) != 3 or rel.parts[0] != domain:
            raise UserError(f"{where} names {rel}, which is not {domain}/<class>/<file>: fix the list")
        cls = rel.parts[1]
        if cls not in index:
            raise UserError(f"{where} names class '{cls}', which has no folder in {root / domain}: fix the list")
        path = root / domain / cls / rel.parts[2]
        if path not in known:
            state = "is not an image file of the domain" if path.exists() else "does not exist"
            raise UserError(f"{where}: listed file {path} {state}; fix the list or restore the file")
        if path in seen:
            # A repeated line is a typo (the official PACS art_painting crossval list repeats
            # dog/pic_248.jpg); counting the image once keeps it, so it is a warning, not an error.
            message = f"{where} lists {path} again (first on line {seen[path]}); counting it once"
            warnings.warn(message, UserWarning, stacklevel=2)
            continue
        seen[path] = number
        rows.append((number, index[cls], int(fields[1])))
        items.append((path, index[cls]))
    if check_labels:
        _check_labels(list_path, classes, rows)
    return items


def read_split_lists(
    root: Path, domain: str, images: dict[str, list[Path]], train_list: Path, val_list: Path, test_lists: list[Path]
) -> tuple[list[_Item], list[_Item], str]:
    """(train, val, source) from split lists, with overlap, per-class and coverage checks."""
    classes = list(images)
    known = {p for paths in images.values() for p in paths}
    train = _parse_list(train_list, root, domain, classes, known, check_labels=True)
    val = _parse_list(val_list, root, domain, classes, known, check_labels=True)
    if not val:
        raise UserError(f"split list {val_list} is empty: add held-out images or set data.splits=none")
    overlap = sorted({p for p, _ in train} & {p for p, _ in val})
    if overlap:
        raise UserError(
            f"{train_list.name} and {val_list.name} share {len(overlap)} images (e.g. {overlap[0]}): "
            "remove them from one list, the held-out split must be disjoint"
        )
    trained = {label for _, label in train}
    untrained = [name for i, name in enumerate(classes) if i not in trained]
    if untrained:
        raise UserError(
            f"split list {train_list} has no images of class(es) {', '.join(untrained)}: "
            "add some or set data.splits=none"
        )
    # Test lists only account for images; their labels are not used here, so they are not checked.
    listed = {p for p, _ in train} | {p for p, _ in val}
    for test_list in test_lists:
        listed |= {p for p, _ in _parse_list(test_list, root, domain, classes, known, check_labels=False)}
    unlisted = sorted(known - listed)
    if unlisted:
        raise UserError(
            f"{len(unlisted)} images of domain {domain} are in no split list (e.g. {unlisted[0]}): "
            "add them to a list, remove them, or set data.splits=none"
        )
    names = ",".join(p.name for p in (train_list, val_list))
    return train, val, f"lists:{names}"


def random_split(
    images: dict[str, list[Path]], val_fraction: float, seed: int
) -> tuple[list[_Item], list[_Item], str]:
    """Stratified seeded split: per class, round(val_fraction * n) images (half rounds up) go to val.

    A class with >= 2 images gives at least 1 and at most n - 1 images to val, so every class is both
    trained and evaluated; a class with 1 image goes to train only. Classes are visited in sorted
    order and images in sorted path order, so a seed always holds out the same files.
    """
    if not 0.0 < val_fraction < 1.0:
        raise UserError(f"data.val_fraction must be in (0, 1), got {val_fraction}: set e.g. data.val_fraction=0.1")
    rng = np.random.default_rng(seed)
    train: list[_Item] = []
    val: list[_Item] = []
    for label, paths in enumerate(images.values()):
        n = len(paths)
        n_val = int(np.floor(val_fraction * n + 0.5)) if n >= 2 else 0
        if n >= 2:
            n_val = min(max(n_val, 1), n - 1)
        held = set(rng.choice(n, size=n_val, replace=False).tolist()) if n_val else set()
        for i, path in enumerate(paths):
            (val if i in held else train).append((path, label))
    if not val:
        raise UserError("no image can be held out: every class has a single image; add images to the training domain")
    return train, val, f"random(val_fraction={val_fraction}, seed={seed})"
