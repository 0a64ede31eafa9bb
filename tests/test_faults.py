"""Faults during training: NaN loss, a failing checkpoint write; and what gmixout may write or read."""

from __future__ import annotations

import errno
import re
from pathlib import Path

import pytest
import safetensors.torch
from rich.console import Console

from conftest import write_domains
from gmixout_cli.config import build_config
from gmixout_cli.errors import UserError
from gmixout_cli.training import finetune
from gmixout_cli.training.checkpoint import CHECKPOINT, read_checkpoint_meta
from gmixout_cli.training.loop import Trainer

PACKAGE = Path(__file__).resolve().parents[1] / "gmixout_cli"


def _cfg(root: Path, **train: object) -> object:
    return build_config({
        "model": {"name": "timm:test_efficientnet", "weights": "random"},
        "data": {"root": str(root / "src"), "image_size": 32, "num_workers": 0},
        "train": {"epochs": 2, "batch_size": 8, "checkpoint_every": 1, "eval_batch_size": 16, **train},
        "method": {"name": "gmixout", "p": 0.8, "k": 2},
    })


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path: Path, monkeypatch) -> None:
    root = write_domains(tmp_path / "data")
    real_step = Trainer.train_step

    def step(self: Trainer, x, y) -> float:  # noqa: ANN001
        loss = real_step(self, x, y)
        return float("nan") if self.step == 3 else loss

    monkeypatch.setattr(Trainer, "train_step", step)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match=r"loss became nan at step 3: lower train.lr"):
        finetune(_cfg(root), run, Console(quiet=True))
    assert read_checkpoint_meta(run / CHECKPOINT)["step"] == 2
    assert not (run / "model.safetensors").exists()


def test_full_disk_keeps_the_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    root = write_domains(tmp_path / "data")
    real_save = safetensors.torch.save_file
    calls = {"n": 0}

    def save(tensors, filename, metadata=None):  # noqa: ANN001
        if metadata and "gmixout_checkpoint" in metadata:
            calls["n"] += 1
            if calls["n"] == 2:
                real_save(dict(list(tensors.items())[:1]), filename)  # a partial file, then the disk is full
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save)
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(UserError, match=r"could not write a checkpoint .*the disk is full; the previous checkpoint "
                                         r"is intact") as exc:
        finetune(_cfg(root), run, Console(quiet=True))
    assert "\n" not in str(exc.value)
    assert read_checkpoint_meta(run / CHECKPOINT)["step"] == 1
    assert not list(run.glob(".*.tmp"))


def test_gmixout_writes_no_pickle_and_reads_pickles_safely() -> None:
    sources = {p: p.read_text() for p in PACKAGE.rglob("*.py")}
    for path, text in sources.items():
        assert "torch.save(" not in text and "import pickle" not in text, path
        assert not re.search(r"yaml\.load\(", text), path  # safe_load only
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, (path, call)


def test_unreadable_folder_is_a_user_error(tmp_path: Path, monkeypatch) -> None:
    import os

    from gmixout_cli.config import DataConfig
    from gmixout_cli.data import load_domain

    root = write_domains(tmp_path / "data")
    real = os.scandir

    def scandir(path):  # noqa: ANN001 - as if `chmod 000` on the class folder (root ignores real permissions)
        if str(path).endswith("green"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(UserError, match=r"cannot read folder .*green: Permission denied; fix its permissions"):
        load_domain(DataConfig(root=str(root / "src")))
