"""gmixout_cli.data.verify: every image decoded once before training; bad files stop or are skipped, loudly."""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from rich.console import Console

from conftest import write_domains
from gmixout_cli.data import (
    DomainData,
    ImageReadError,
    build_transform,
    image_problem,
    read_image,
    verify_domain_data,
    verify_images,
)
from gmixout_cli.errors import UserError

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


def _noise(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _jpeg_bytes(seed: int = 0, size: tuple[int, int] = (48, 40)) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(_noise(size[1], size[0], seed)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_bad_files(folder: Path) -> dict[str, Path]:
    """The three kinds of unreadable file: random bytes as .jpg, half a JPEG, a text file as .png."""
    folder.mkdir(parents=True, exist_ok=True)
    corrupt = folder / "b_corrupt.jpg"
    corrupt.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    truncated = folder / "d_truncated.jpg"
    whole = _jpeg_bytes(seed=2)
    truncated.write_bytes(whole[: len(whole) // 2])
    text = folder / "f_text.png"
    text.write_text("this is not a picture\n")
    return {"corrupt": corrupt, "truncated": truncated, "text": text}


@pytest.fixture
def mixed(tmp_path: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, int]], dict[str, Path]]:
    """(all items in name order, the good ones in order, the bad files): good and bad interleaved."""
    folder = tmp_path / "imgs"
    bad = write_bad_files(folder)
    for i, name in enumerate(["a_good.png", "c_good.jpg", "e_good.png", "g_good.jpg"]):
        Image.fromarray(_noise(20, 24, seed=10 + i)).save(folder / name)
    paths = sorted(folder.iterdir())
    items = [(p, i % 3) for i, p in enumerate(paths)]
    good = [item for item in items if "good" in item[0].name]
    return items, good, bad


# --- error and skip modes --------------------------------------------------------------------------------


def test_error_mode_raises_one_line_naming_a_bad_file_the_count_and_the_fix(mixed) -> None:
    items, _, bad = mixed
    with pytest.raises(ImageReadError) as info:
        verify_images(items, "error", workers=2, what="the training domain src")
    message = str(info.value)
    assert "\n" not in message
    assert str(bad["corrupt"]) in message  # the first bad file in item order
    assert "3 images" in message and "the training domain src" in message
    assert "data.unreadable=skip" in message and "remove or replace" in message
    assert isinstance(info.value, UserError) and info.value.exit_code == 2


def test_error_mode_with_one_bad_file_says_it(tmp_path: Path) -> None:
    good = tmp_path / "good.png"
    Image.fromarray(_noise(8, 8)).save(good)
    text = tmp_path / "notes.png"
    text.write_text("hello")
    with pytest.raises(ImageReadError, match=r"cannot read 1 image in training data \(.*notes\.png: not a recogn"):
        verify_images([(good, 0), (text, 1)], "error")


def test_skip_mode_returns_good_items_in_order_and_the_bad_with_reasons_and_warns(mixed) -> None:
    items, good, bad = mixed
    with pytest.warns(UserWarning, match=r"skipped 3 unreadable images in training data \(e\.g\. .*b_corrupt\.jpg: "):
        kept, skipped = verify_images(items, "skip", workers=2)
    assert kept == good
    assert [p for p, _ in skipped] == [bad["corrupt"], bad["truncated"], bad["text"]]
    reasons = dict(skipped)
    assert "not a recognisable image" in reasons[bad["corrupt"]]
    assert "truncated" in reasons[bad["truncated"]]
    assert "not a recognisable image" in reasons[bad["text"]]
    assert all(reason and "\n" not in reason for reason in reasons.values())


@pytest.mark.parametrize("mode", ["error", "skip"])
@pytest.mark.parametrize("workers", [0, 1, 3])
def test_all_readable_returns_items_unchanged_without_warning(mixed, mode: str, workers: int) -> None:
    _, good, _ = mixed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert verify_images(good, mode, workers=workers) == (good, [])
    assert verify_images([], mode) == ([], [])


def test_unknown_mode_is_a_programming_error(mixed) -> None:
    with pytest.raises(ValueError, match="error"):
        verify_images(mixed[1], "ignore")


def test_verifier_agrees_with_read_image(mixed) -> None:
    """The fast path (draft decoding, no RGB conversion) accepts exactly what training can read."""
    items, _, _ = mixed
    for path, _ in items:
        try:
            read_image(path)
            readable = True
        except ImageReadError:
            readable = False
        assert (image_problem(path) is None) == readable, path


@pytest.mark.parametrize("fmt", ["PNG", "GIF", "BMP", "TIFF", "WEBP"])
def test_truncated_files_of_other_formats_are_caught(tmp_path: Path, fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(_noise(64, 64)).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * 0.6)])
    assert image_problem(path) is not None


def test_missing_file_is_reported_not_crashed(tmp_path: Path) -> None:
    assert image_problem(tmp_path / "gone.jpg") == "No such file or directory"


# --- unusual but valid images ---------------------------------------------------------------------------


def _grey() -> Image.Image:
    return Image.fromarray(np.linspace(0, 255, 30 * 40, dtype=np.float64).reshape(30, 40).astype(np.uint8), "L")


def _palette_transparent() -> Image.Image:
    image = Image.fromarray(_noise(30, 40)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    image.info["transparency"] = 0
    return image


def _rgba() -> Image.Image:
    rgba = np.dstack([_noise(30, 40), np.tile(np.linspace(0, 255, 40, dtype=np.uint8), (30, 1))])
    return Image.fromarray(rgba, "RGBA")


def _cmyk() -> Image.Image:
    return Image.fromarray(_noise(30, 40)).convert("CMYK")


def _grey16() -> Image.Image:
    values = np.linspace(0, 65535, 30 * 40).reshape(30, 40).astype(np.uint16)
    return Image.fromarray(values)  # uint16 -> I;16


UNUSUAL: dict[str, tuple[Callable[[], Image.Image], str, dict]] = {
    "grey_L.png": (_grey, "L", {}),
    "palette_P_transparent.png": (_palette_transparent, "P", {"transparency": 0}),
    "cmyk.jpg": (_cmyk, "CMYK", {}),
    "rgba.png": (_rgba, "RGBA", {}),
    "grey16.png": (_grey16, "I;16", {}),
}


def write_unusual(folder: Path, name: str) -> Path:
    make, _, save_kwargs = UNUSUAL[name]
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    make().save(path, **save_kwargs)
    return path


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_valid_images_pass_and_become_3_channel_tensors(tmp_path: Path, name: str) -> None:
    path = write_unusual(tmp_path, name)
    with Image.open(path) as opened:
        assert opened.mode.startswith(UNUSUAL[name][1][:3])  # I;16 may open as I;16 or I
        assert name != "palette_P_transparent.png" or "transparency" in opened.info
    assert verify_images([(path, 0)], "error") == ([(path, 0)], [])
    tensor = build_transform(32, MEAN, STD, train=True)(read_image(path))
    assert tensor.shape == (3, 32, 32) and tensor.dtype == torch.float32 and torch.isfinite(tensor).all()


def test_large_image_below_the_decompression_bomb_warning_decodes_silently(tmp_path: Path) -> None:
    """6000x4000 = 24 MP, under PIL's 89.5 MP DecompressionBombWarning threshold."""
    assert 6000 * 4000 < Image.MAX_IMAGE_PIXELS
    path = tmp_path / "large.jpg"
    ramp = np.linspace(0, 255, 6000, dtype=np.float32).astype(np.uint8)
    Image.fromarray(np.dstack([np.tile(ramp, (4000, 1))] * 3)).save(path, quality=85)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # neither a bomb warning nor a skip warning
        assert verify_images([(path, 0)], "skip") == ([(path, 0)], [])
        tensor = build_transform(32, MEAN, STD, train=True)(read_image(path))
    assert tensor.shape == (3, 32, 32)


def test_image_above_the_bomb_warning_but_below_the_error_threshold_is_not_rejected(tmp_path: Path) -> None:
    """10000x9000 = 90 MP: PIL warns (> 89.5 MP) but only refuses above 2x that (179 MP); we accept it."""
    pixels = 10000 * 9000
    assert Image.MAX_IMAGE_PIXELS < pixels < 2 * Image.MAX_IMAGE_PIXELS
    path = tmp_path / "huge.png"
    start = time.perf_counter()
    grey = np.zeros((9000, 10000), dtype=np.uint8)  # 90 MB; mode L keeps memory down
    grey[::50] = 255
    Image.fromarray(grey, "L").save(path, compress_level=1)
    del grey
    if time.perf_counter() - start > 5:
        pytest.skip("writing a 90 MP PNG took over 5 s on this machine")
    with pytest.warns(Image.DecompressionBombWarning):
        kept, skipped = verify_images([(path, 0)], "error")
    assert kept == [(path, 0)] and skipped == []


# --- the training domain --------------------------------------------------------------------------------


def _domain_data(root: Path) -> DomainData:
    def items(cls: str, label: int, names: list[str]) -> list[tuple[Path, int]]:
        return [(root / "src" / cls / n, label) for n in names]

    return DomainData(
        root=root, domain="src", classes=["blue", "green", "red"],
        train=items("blue", 0, ["000.png", "001.png"]) + items("green", 1, ["000.png", "001.png"])
        + items("red", 2, ["000.png", "001.png"]),
        val=items("blue", 0, ["002.png"]) + items("green", 1, ["002.png"]) + items("red", 2, ["002.png"]),
        split_source="test",
    )


def test_verify_domain_data_skip_removes_bad_items_from_both_splits(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", domains=("src",), per_class=3, size=8)
    data = _domain_data(root)
    (root / "src" / "green" / "001.png").write_text("not a png")  # train
    (root / "src" / "red" / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n")  # val
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable images in the training domain src"):
        clean, n = verify_domain_data(data, "skip", workers=2)
    assert n == 2
    assert clean.train == [item for item in data.train if item[0].parts[-2:] != ("green", "001.png")]
    assert clean.val == data.val[:2]
    assert (clean.root, clean.domain, clean.classes, clean.split_source) == (
        data.root, data.domain, data.classes, data.split_source)
    with pytest.raises(ImageReadError, match=r"cannot read 2 images in the training domain src .*green/001\.png"):
        verify_domain_data(data, "error", workers=2)


def test_verify_domain_data_all_fine_returns_the_same_data(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", domains=("src",), per_class=3, size=8)
    data = _domain_data(root)
    assert verify_domain_data(data, "error", workers=2) == (data, 0)
    assert verify_domain_data(data, "skip", workers=1) == (data, 0)


def test_skipping_every_training_image_of_a_class_is_an_error(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", domains=("src",), per_class=3, size=8)
    data = _domain_data(root)
    for name in ("000.png", "001.png"):
        (root / "src" / "red" / name).write_text("x")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="class red of the training domain src has no"):
        verify_domain_data(data, "skip", workers=2)


def test_skipping_every_held_out_image_is_an_error(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", domains=("src",), per_class=3, size=8)
    data = _domain_data(root)
    for cls in ("blue", "green", "red"):
        (root / "src" / cls / "002.png").write_text("x")
    with pytest.warns(UserWarning), pytest.raises(UserError, match="no readable held-out images"):
        verify_domain_data(data, "skip", workers=2)


# --- end to end -----------------------------------------------------------------------------------------


def test_unusual_images_train_normally(tmp_path: Path) -> None:
    from gmixout_cli.config import build_config
    from gmixout_cli.data import load_domain
    from gmixout_cli.training import finetune

    root = write_domains(tmp_path / "data", per_class=6)
    domain = root / "src"
    for cls, names in (("red", ["grey_L.png", "rgba.png"]), ("green", ["palette_P_transparent.png"]),
                       ("blue", ["cmyk.jpg", "grey16.png"])):
        for name in names:
            write_unusual(domain / cls, name)
    cfg = build_config({
        "model": {"name": "timm:test_efficientnet", "weights": "random"},
        "data": {"root": str(domain), "image_size": 32, "num_workers": 0},
        "train": {"epochs": 1, "max_steps": 2, "batch_size": 4, "eval_batch_size": 8},
        "method": {"name": "gmixout", "p": 0.8, "k": 1},
    })
    data = load_domain(cfg.data)
    assert len(data.train) + len(data.val) == 3 * 6 + 5
    assert verify_domain_data(data, "error", workers=2) == (data, 0)
    run_dir = tmp_path / "run"
    finetune(cfg, run_dir, Console(quiet=True))
    assert (run_dir / "results.json").is_file()
