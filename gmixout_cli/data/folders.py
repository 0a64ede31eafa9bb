"""ImageFolder domains: scanning ROOT/DOMAIN/<class>/<image>, sibling domains, class-set checks.

Layout rules (every violation is a `UserError`, nothing is dropped silently):

- Class folders are the non-hidden sub-folders of DOMAIN; their sorted names are the labels.
- Images sit directly in class folders (no nesting: a nested folder usually means ROOT was passed
  where ROOT/DOMAIN was expected, which would otherwise train a classifier over domains).
- Ignored without a word: hidden entries (names starting with '.', e.g. `.DS_Store`, macOS `._x`
  forks, `.ipynb_checkpoints`) and the OS thumbnail sidecars in `SIDECAR_FILES`. Any other
  non-image file in a class folder is an error. Non-image files directly in DOMAIN (a README, a
  CSV) are ignored because they cannot be mistaken for data; images there are an error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from gmixout_cli.config.schema import DataConfig
from gmixout_cli.data.builtin import resolve_root
from gmixout_cli.data.splits import split_domain
from gmixout_cli.errors import UserError

Item = tuple[Path, int]
"""(image path, class index)."""

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
"""Lower-case suffixes counted as images (matched case-insensitively)."""

SIDECAR_FILES = frozenset({"thumbs.db", "ehthumbs.db", "desktop.ini"})
"""Windows Explorer sidecars that appear in image folders and carry no data (lower-case names)."""

SPLITS_FOLDER = "splits"
"""The folder beside the domains that holds split lists; never a domain itself."""


@dataclass
class DomainData:
    """The training domain: its classes and its train / held-out split."""

    root: Path
    """The folder holding the domains (parent of the training domain)."""
    domain: str
    """Training domain name."""
    classes: list[str]
    """Sorted class folder names (index = label)."""
    train: list[Item]
    """Training split."""
    val: list[Item]
    """Held-out split of the training domain (in-domain evaluation uses it)."""
    split_source: str
    """`lists:<file names>` or `random(val_fraction=0.1, seed=0)`."""


def is_image_name(name: str) -> bool:
    """Whether a file name has one of the image extensions (case-insensitive)."""
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _example(paths: list[Path] | list[str], noun: str) -> str:
    """'3 files (e.g. /a/b.txt)' for error messages."""
    return f"{len(paths)} {noun}{'s' * (len(paths) != 1)} (e.g. {paths[0]})"


def _entries(folder: Path | str) -> list[os.DirEntry]:
    """The entries of a folder; an unreadable folder is a user error, not a traceback."""
    try:
        with os.scandir(folder) as it:
            return list(it)
    except OSError as exc:
        reason = exc.strerror or exc
        raise UserError(f"cannot read folder {folder}: {reason}; fix its permissions or the path") from None


def scan_domain(domain_dir: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image paths of one domain folder, in sorted class order.

    Raises:
        UserError: on a missing folder, no class folders, nested folders, non-image files, or an
            empty class folder.
    """
    if not domain_dir.exists():
        raise UserError(
            f"data folder {domain_dir} does not exist: check the path (expected ROOT/DOMAIN/<class>/<image>)"
        )
    if not domain_dir.is_dir():
        raise UserError(
            f"data folder {domain_dir} is not a folder: point data.root at ROOT/DOMAIN, the folder of class folders"
        )
    class_names: list[str] = []
    loose_images: list[Path] = []
    for entry in _entries(domain_dir):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            class_names.append(entry.name)
        elif is_image_name(entry.name):
            loose_images.append(Path(entry.path))
    class_names.sort()
    loose_images.sort()
    if not class_names:
        found = f" but {_example(loose_images, 'image')} directly in it" if loose_images else ""
        raise UserError(
            f"{domain_dir} has no class folders{found}: expected ROOT/DOMAIN/<class>/<image>; "
            "point data.root at the folder whose sub-folders are the classes"
        )
    if loose_images:
        raise UserError(
            f"{domain_dir} holds {_example(loose_images, 'image')} outside class folders: move them into a class folder"
        )

    images: dict[str, list[Path]] = {}
    non_images: list[Path] = []
    for name in class_names:
        files: list[Path] = []
        for entry in _entries(domain_dir / name):
            if entry.name.startswith("."):
                continue
            if entry.is_dir():
                raise UserError(
                    f"class folder {domain_dir / name} contains a folder '{entry.name}': images must sit "
                    "directly in class folders (ROOT/DOMAIN/<class>/<image>); "
                    "if you passed ROOT, pass ROOT/DOMAIN instead"
                )
            if is_image_name(entry.name):
                files.append(Path(entry.path))
            elif entry.name.lower() not in SIDECAR_FILES:
                non_images.append(Path(entry.path))
        images[name] = sorted(files)
    if non_images:
        non_images.sort()
        allowed = ", ".join(sorted(IMAGE_EXTENSIONS))
        raise UserError(
            f"domain {domain_dir.name} has {_example(non_images, 'file')} that are not images: "
            f"remove them (images end in {allowed})"
        )
    empty = [name for name in class_names if not images[name]]
    if empty:
        more = f" (empty class folders: {', '.join(empty)})" if len(empty) > 1 else ""
        raise UserError(f"class folder {domain_dir / empty[0]} has no images{more}: add images or remove the folder")
    return images


def _domain_dir(root: str) -> Path:
    """The absolute training-domain folder named by data.root (symlinks kept, '..' collapsed)."""
    if not root.strip():
        raise UserError("data.root is empty: set --data ROOT/DOMAIN or data.root=...")
    # abspath, not resolve(): resolving a symlinked domain folder would change its parent, the ROOT.
    return Path(os.path.abspath(resolve_root(root.strip())))


def load_domain(cfg: DataConfig) -> DomainData:
    """Scan the training domain named by `cfg.root` and split it (lists or seeded random).

    Raises:
        UserError: on any layout or split-list problem.
    """
    domain_dir = _domain_dir(cfg.root)
    images = scan_domain(domain_dir)
    classes = list(images)
    train, val, source = split_domain(domain_dir.parent, domain_dir.name, images, cfg)
    return DomainData(
        root=domain_dir.parent, domain=domain_dir.name, classes=classes, train=train, val=val, split_source=source
    )


def _available_siblings(data: DomainData) -> list[str]:
    """Sorted sibling folders of the training domain that contain at least one class folder."""
    found: list[str] = []
    for entry in _entries(data.root):
        if entry.name.startswith(".") or entry.name in (data.domain, SPLITS_FOLDER) or not entry.is_dir():
            continue
        if any(not e.name.startswith(".") and e.is_dir() for e in _entries(entry.path)):
            found.append(entry.name)
    return sorted(found)


def sibling_domains(data: DomainData, requested: list[str] | None) -> list[str]:
    """The out-of-domain evaluation domains: `requested` (validated, de-duplicated) or every sibling.

    Raises:
        UserError: when a requested name is the training domain or not a sibling domain.
    """
    available = _available_siblings(data)
    if requested is None:
        return available
    chosen: list[str] = []
    for name in requested:
        if name == data.domain:
            raise UserError(
                f"data.ood names the training domain '{name}': in-domain accuracy comes from its held-out split; "
                "list only sibling domains"
            )
        if name not in available:
            listing = ", ".join(available) if available else "none"
            raise UserError(
                f"unknown data.ood domain '{name}': the sibling domains of {data.domain} in {data.root} are {listing}"
            )
        if name not in chosen:
            chosen.append(name)
    return chosen


def load_eval_domain(data: DomainData, domain: str) -> list[Item]:
    """Every image of sibling domain `domain`, labelled with the training domain's class indices.

    Raises:
        UserError: on layout problems or when its class set differs from the training domain's.
    """
    images = scan_domain(data.root / domain)
    extra = sorted(set(images) - set(data.classes))
    missing = sorted(set(data.classes) - set(images))
    if extra or missing:
        parts = ([f"extra classes {extra}"] if extra else []) + ([f"missing classes {missing}"] if missing else [])
        raise UserError(
            f"domain {domain} does not have the classes of training domain {data.domain}: {'; '.join(parts)}; "
            "make the class folders match or leave the domain out of data.ood"
        )
    index = {name: i for i, name in enumerate(data.classes)}
    return [(path, index[name]) for name in data.classes for path in images[name]]
