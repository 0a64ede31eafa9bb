"""benchmarks.fmnist_c on the real Debian Fashion-MNIST files: layout, images, reruns, errors."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks import fmnist_c

pytestmark = pytest.mark.bench

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--train-per-class", "3", "--test-per-class", "2", "--corruptions", "gaussian_noise,impulse_noise,contrast"]


@pytest.fixture(autouse=True)
def _needs_data() -> None:
    if not fmnist_c.SOURCE_DIR.is_dir():
        pytest.skip(f"no {fmnist_c.SOURCE_DIR}: {fmnist_c.APT_HINT}")
    if importlib.util.find_spec("imagecorruptions") is None:
        pytest.skip(f"imagecorruptions missing: {fmnist_c.PIP_HINT}")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "benchmarks.fmnist_c", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_tiny_build_layout_images_and_rerun(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fmnist_c"
    assert fmnist_c.main(["--out", str(out), "--workers", "1", *TINY]) == 0
    domains = ["clean", "test_clean", "gaussian_noise", "impulse_noise", "contrast"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*domains, "manifest.json"])  # no partial folders left
    for domain in domains:
        assert sorted(p.name for p in (out / domain).iterdir()) == sorted(fmnist_c.CLASSES)
        per_class = 3 if domain == "clean" else 2
        assert all(len(list((out / domain / c).iterdir())) == per_class for c in fmnist_c.CLASSES)
    # the same test image names in every test domain; train and test images come from different files
    test_names = {str(p.relative_to(out / "test_clean")) for p in (out / "test_clean").rglob("*.png")}
    for domain in domains[2:]:
        assert {str(p.relative_to(out / domain)) for p in (out / domain).rglob("*.png")} == test_names
    for path in out.rglob("*.png"):
        with Image.open(path) as img:
            assert (img.size, img.mode) == ((32, 32), "RGB")
    for name in sorted(test_names):
        clean = np.asarray(Image.open(out / "test_clean" / name))
        assert (clean[..., 0] == clean[..., 1]).all() and (clean[..., 1] == clean[..., 2]).all()  # grey as RGB
        for corruption in domains[2:]:
            assert not np.array_equal(np.asarray(Image.open(out / corruption / name)), clean), (corruption, name)
    # the first images of each class in file order: the test file's image 0 is an ankle boot
    assert (out / "test_clean" / "ankle_boot" / "00000.png").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["domains"]["clean"]["count"] == 30 and manifest["domains"]["contrast"]["count"] == 20
    assert manifest["severity"] == 3 and manifest["corruptions"] == ["gaussian_noise", "impulse_noise", "contrast"]
    assert set(manifest["source"]["files"]) == set(fmnist_c.SOURCE_FILES.values())
    assert manifest["imagecorruptions"] == manifest["versions"]["imagecorruptions-imaug"]

    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    capsys.readouterr()
    assert fmnist_c.main(["--out", str(out), "--workers", "1", *TINY]) == 0
    assert "complete" in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before  # a rerun writes nothing

    # a rebuild in two worker processes writes the same bytes (every corruption seeded per image)
    again = tmp_path / "again"
    assert fmnist_c.main(["--out", str(again), "--workers", "2", *TINY]) == 0
    assert _files(again) == _files(out)


def test_changed_settings_rebuild_and_drop_stale_domains(tmp_path: Path) -> None:
    out = tmp_path / "fmnist_c"
    assert fmnist_c.main(["--out", str(out), "--workers", "1", *TINY]) == 0
    args = ["--out", str(out), "--workers", "1", "--train-per-class", "3", "--test-per-class", "2"]
    assert fmnist_c.main([*args, "--corruptions", "contrast", "--severity", "5"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["clean", "contrast", "manifest.json", "test_clean"]
    assert json.loads((out / "manifest.json").read_text())["severity"] == 5
    (out / "mine").mkdir()  # a folder it did not write would become a test domain: refused
    assert fmnist_c.main([*args, "--corruptions", "fog"]) == 2


def test_unknown_corruption_is_one_line_exit_2(tmp_path: Path) -> None:
    result = _run("--out", str(tmp_path / "x"), "--corruptions", "gaussian_noise,not_a_corruption")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "not_a_corruption" in lines[0] and "elastic_transform" in lines[0], result.stderr
    assert not (tmp_path / "x").exists()


def test_missing_source_is_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fmnist_c.main(["--out", str(tmp_path / "x"), "--source", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
