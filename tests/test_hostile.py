"""Hostile recipes, damaged checkpoints, full disks, stops at awkward moments, two runs on one folder: each ends
in one line (exit 2, or 128 + the signal) and nothing already written is lost."""

from __future__ import annotations

import errno
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import TINY_ARGS, write_domains
from gmixout_cli.training.checkpoint import CHECKPOINT, read_checkpoint_meta
from gmixout_cli.training.runs import claim

BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 9)}]\n" for i in range(8))


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- recipes ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text, expected", [
    (BOMB, "expands to more than 10,000 values (YAML aliases"),
    ("model: &m {name: x, t: [*m]}\n", "inside its own anchor"),
    ("train: " + "[" * 40 + "]" * 40 + "\n", "nests values more than 16 levels deep"),
    ("train:\n  seed: " + "9" * 5000 + "\n", "holds a value that cannot be read"),
    ("# padding\n" * 30_000, "more than a recipe can be (256 KiB)"),
])
def test_hostile_recipe_is_refused_fast_with_one_line(tmp_path: Path, cli, text: str, expected: str) -> None:
    path = tmp_path / "shared.yaml"
    path.write_text(text)
    start = time.perf_counter()
    code, _, err = cli("finetune", "--recipe", str(path), "--data", str(tmp_path))
    assert time.perf_counter() - start < 1.0
    line = _one_line(err)
    assert code == 2 and str(path) in line and expected in line, line


def test_bomb_in_an_override_is_refused(tmp_path: Path, cli) -> None:
    code, _, err = cli("finetune", "--data", str(tmp_path), "data.ood=" + BOMB.replace("\n", " ").replace(": &", ": &"))
    assert code == 2 and "override" in _one_line(err)


def test_small_aliases_still_work(tmp_path: Path) -> None:
    from gmixout_cli.config import load_config

    path = tmp_path / "aliases.yaml"
    path.write_text("train:\n  lr: &lr 3.0e-4\n  head_lr: *lr\nmethod: &m {name: gmixout, p: 0.8}\n")
    cfg = load_config(str(path), [])
    assert cfg.train.lr == cfg.train.head_lr == 3e-4 and cfg.method.p == 0.8


# -- resume auto with --out ---------------------------------------------------------------------------------------

def _stop_at(monkeypatch: pytest.MonkeyPatch, step: int, *signals: int) -> None:
    """Send these signals to this process during training step `step`."""
    from gmixout_cli.training.loop import Trainer

    real = Trainer.train_step

    def train_step(self: Trainer, x: torch.Tensor, y: torch.Tensor) -> float:
        if self.step + 1 == step:
            for s in signals:
                os.kill(os.getpid(), s)
        return real(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", train_step)


def test_resume_auto_with_out_starts_continues_and_refuses(tmp_path: Path, cli, monkeypatch) -> None:
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "job"
    args = ("finetune", "--resume", "auto", "--out", str(run), "--data", str(data), *TINY_ARGS)
    with monkeypatch.context() as m:
        _stop_at(m, 3, signal.SIGTERM)
        code, out, err = cli(*args)  # nothing there yet: a fresh start, stopped at step 3
    assert code == 143 and "stopped by SIGTERM at step 3" in _one_line(err)
    assert "run folder" in out and read_checkpoint_meta(run / CHECKPOINT)["step"] == 3

    code, out, err = cli(*args)  # the same command again: it continues
    assert code == 0, err
    assert "resuming" in out and "resumed from" in out and "at step 3" in out
    assert (run / "results.json").is_file() and not (run / CHECKPOINT).exists()

    code, _, err = cli(*args)  # and once finished it refuses
    assert code == 2 and "already finished (results.json exists)" in _one_line(err)

    whole = tmp_path / "whole"
    assert cli("finetune", "--out", str(whole), "--data", str(data), *TINY_ARGS)[0] == 0
    assert (whole / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_resume_auto_restarts_a_run_that_never_checkpointed(tmp_path: Path, cli) -> None:
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "job"
    run.mkdir()
    (run / "config.yaml").write_text("model: {}\n")  # as left by a run killed before its first checkpoint
    (run / "metrics.jsonl").write_text('{"step": 1}\n')
    code, _, err = cli("finetune", "--resume", "auto", "--out", str(run), "--data", str(data), *TINY_ARGS)
    assert code == 0, err
    assert "stopped before its first checkpoint: starting it again" in err
    assert (run / "results.json").is_file()
    assert (run / "metrics.jsonl").read_text().startswith('{"step": 1}\n')  # the old log is kept, appended to


def test_resume_auto_with_out_refuses_a_foreign_folder(tmp_path: Path, cli) -> None:
    run = tmp_path / "mine"
    run.mkdir()
    (run / "thesis.tex").write_text("keep me")
    code, _, err = cli("finetune", "--resume", "auto", "--out", str(run), "--data", str(tmp_path), *TINY_ARGS)
    assert code == 2 and "already exists and is not empty" in _one_line(err)
    assert (run / "thesis.tex").read_text() == "keep me"


def test_a_folder_in_use_is_refused(tmp_path: Path, cli) -> None:
    run = tmp_path / "busy"
    with claim(run):
        code, _, err = cli("finetune", "--out", str(run), "--data", str(tmp_path), *TINY_ARGS)
    assert code == 2 and f"in use by another gmixout process (pid {os.getpid()})" in _one_line(err)


# -- damaged and foreign checkpoints ------------------------------------------------------------------------------

@pytest.fixture
def stopped_run(tmp_path: Path, cli, monkeypatch) -> Path:
    """A gmixout run stopped by SIGTERM at step 3, with its checkpoint."""
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        _stop_at(m, 3, signal.SIGTERM)
        code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS, "method.p=0.8",
                           "method.k=2")
    assert code == 143, err
    return run


def test_truncated_checkpoint_is_one_line(stopped_run: Path, cli) -> None:
    path = stopped_run / CHECKPOINT
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    code, _, err = cli("finetune", "--resume", str(stopped_run))
    assert code == 2 and "is truncated or damaged" in _one_line(err)


def test_foreign_file_as_checkpoint_is_one_line(stopped_run: Path, cli) -> None:
    save_file({"w": torch.zeros(3)}, str(stopped_run / CHECKPOINT))
    code, _, err = cli("finetune", "--resume", str(stopped_run))
    assert code == 2 and "is not a readable gmixout checkpoint" in _one_line(err)
    (stopped_run / CHECKPOINT).write_bytes(b"\x00" * 100)
    code, _, err = cli("finetune", "--resume", str(stopped_run))
    assert code == 2 and "is not a readable gmixout checkpoint" in _one_line(err)


def test_checkpoint_with_out_of_range_indices_is_refused(stopped_run: Path, cli) -> None:
    path = stopped_run / CHECKPOINT
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith(".indices"))
    tensors[key] = tensors[key] + 10**8  # would index far past the weight in the kernels
    meta = {"gmixout_checkpoint": json.dumps(read_checkpoint_meta(path))}
    save_file(tensors, str(path), metadata=meta)
    code, _, err = cli("finetune", "--resume", str(stopped_run))
    line = _one_line(err)
    assert code == 2 and "does not match this run" in line and "does not fit that weight" in line


def test_checkpoint_from_another_run_is_refused(stopped_run: Path, cli, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    (other / CHECKPOINT).write_bytes((stopped_run / CHECKPOINT).read_bytes())
    config = (stopped_run / "config.yaml").read_text().replace("lr: 0.001", "lr: 0.002")
    (other / "config.yaml").write_text(config)
    code, _, err = cli("finetune", "--resume", str(other))
    assert code == 2 and "was written with another config" in _one_line(err)


def test_stale_temporary_files_are_removed_on_resume(stopped_run: Path, cli) -> None:
    stale = stopped_run / f".{CHECKPOINT}.abc123.tmp"  # as a SIGKILL during a checkpoint write leaves
    stale.write_bytes(b"partial")
    assert cli("finetune", "--resume", str(stopped_run))[0] == 0
    assert not stale.exists()


# -- stops at awkward moments ---------------------------------------------------------------------------------------

def test_signals_during_a_checkpoint_write_wait_for_it(tmp_path: Path, cli, monkeypatch) -> None:
    import gmixout_cli.training.checkpoint as checkpoint

    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    real = checkpoint.save_safetensors

    def save(path: Path, tensors: dict, metadata: dict | None = None) -> None:
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler, then an impatient user, mid-write
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.01)
        real(path, tensors, metadata)

    monkeypatch.setattr(checkpoint, "save_safetensors", save)
    code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS, "train.checkpoint_every=2")
    assert code == 143 and "stopped by SIGTERM at step 2" in _one_line(err)
    assert read_checkpoint_meta(run / CHECKPOINT)["step"] == 2 and not list(run.glob(".*.tmp"))


def test_second_sigint_mid_step_stops_at_once_and_keeps_the_last_checkpoint(tmp_path: Path, cli, monkeypatch) -> None:
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    _stop_at(monkeypatch, 3, signal.SIGINT, signal.SIGINT)
    code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS, "train.checkpoint_every=1")
    line = _one_line(err)
    assert code == 130 and "stopped at once by a second SIGINT during step 3" in line
    assert "the checkpoint of step 2 is kept" in line and read_checkpoint_meta(run / CHECKPOINT)["step"] == 2


def test_stop_before_training_leaves_nothing_behind(tmp_path: Path, cli, monkeypatch) -> None:
    import gmixout_cli.training.pipeline as pipeline

    data = write_domains(tmp_path / "data") / "src"
    real = pipeline.verify_domain_data

    def verify(*args, **kwargs):  # noqa: ANN002, ANN003
        os.kill(os.getpid(), signal.SIGHUP)
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "verify_domain_data", verify)
    run = tmp_path / "run"
    code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS)
    assert code == 129 and "stopped by SIGHUP before training started" in _one_line(err)
    assert not run.exists()

    given = tmp_path / "given"  # an empty folder the user made: it stays, empty, and the same command works again
    given.mkdir()
    code, _, err = cli("finetune", "--out", str(given), "--data", str(data), *TINY_ARGS, "model.head_init=zero")
    assert code == 129 and given.is_dir() and not list(given.iterdir())
    monkeypatch.setattr(pipeline, "verify_domain_data", real)
    code, _, err = cli("finetune", "--out", str(given), "--data", str(data), *TINY_ARGS, "model.head_init=zero")
    assert code == 0, err


def test_stop_during_evaluation_keeps_the_model_and_resume_evaluates(tmp_path: Path, cli, monkeypatch) -> None:
    import gmixout_cli.training.pipeline as pipeline

    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    real = pipeline.evaluate_domains
    with monkeypatch.context() as m:
        def evaluate(*args, **kwargs):  # noqa: ANN002, ANN003
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)
            return real(*args, **kwargs)

        m.setattr(pipeline, "evaluate_domains", evaluate)
        code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS)
    assert code == 143 and "stopped by SIGTERM during evaluation; the model is saved" in _one_line(err)
    exported = (run / "model.safetensors").read_bytes()
    code, out, err = cli("finetune", "--resume", str(run))
    assert code == 0, err
    assert (run / "results.json").is_file() and (run / "model.safetensors").read_bytes() == exported


def test_full_disk_at_export_keeps_the_final_step(tmp_path: Path, cli, monkeypatch) -> None:
    import gmixout_cli.training.pipeline as pipeline

    data = write_domains(tmp_path / "data") / "src"
    run, whole = tmp_path / "run", tmp_path / "whole"
    with monkeypatch.context() as m:
        def full_disk(path: Path, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
            raise OSError(errno.ENOSPC, "No space left on device", str(path))

        m.setattr(pipeline, "save_classifier", full_disk)
        code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS)
    line = _one_line(err)
    assert code == 2 and f"could not write {run / 'model.safetensors'}: the disk is full" in line
    assert "the checkpoint of the final step is kept" in line
    steps = read_checkpoint_meta(run / CHECKPOINT)["step"]
    code, _, err = cli("finetune", "--resume", str(run))  # exports without training again
    assert code == 0, err
    assert json.loads((run / "results.json").read_text())["steps"] == steps
    assert cli("finetune", "--out", str(whole), "--data", str(data), *TINY_ARGS)[0] == 0
    assert (whole / "model.safetensors").read_bytes() == (run / "model.safetensors").read_bytes()


def test_a_loader_worker_lost_during_evaluation_keeps_the_model_and_resume_evaluates(
        tmp_path: Path, cli, monkeypatch) -> None:  # noqa: ANN001
    import gmixout_cli.training.pipeline as pipeline

    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    with monkeypatch.context() as m:
        def lost(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - what torch raises when a worker was killed
            raise RuntimeError("DataLoader worker (pid(s) 4242) exited unexpectedly")

        m.setattr(pipeline, "evaluate", lost)
        code, _, err = cli("finetune", "--out", str(run), "--data", str(data), *TINY_ARGS)
    line = _one_line(err)
    assert code == 2 and "a data loader worker exited unexpectedly during evaluation" in line
    assert f"the model is saved at {run / 'model.safetensors'}" in line and f"--resume {run}" in line
    assert (run / "model.safetensors").is_file() and (run / CHECKPOINT).is_file()
    code, _, err = cli("finetune", "--resume", str(run), "data.num_workers=1")  # as the line suggests
    assert code == 0, err
    assert (run / "results.json").is_file() and not (run / CHECKPOINT).exists()


def test_a_loader_worker_lost_while_checking_images_is_one_line(tmp_path: Path, cli, monkeypatch) -> None:  # noqa: ANN001
    import gmixout_cli.training.pipeline as pipeline

    def lost(*args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(pipeline, "verify_domain_data", lost)
    code, _, err = cli("finetune", "--out", str(tmp_path / "run"), "--data",
                       str(write_domains(tmp_path / "data") / "src"), *TINY_ARGS)
    assert code == 2 and "exited unexpectedly before training started; nothing was trained" in _one_line(err)


def test_full_disk_anywhere_else_is_one_line(tmp_path: Path, cli, monkeypatch) -> None:
    import gmixout_cli.training.pipeline as pipeline

    data = write_domains(tmp_path / "data") / "src"

    def full_disk(path: Path, *args, **kwargs) -> None:  # noqa: ANN002, ANN003
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(pipeline, "save_safetensors", full_disk)  # the initial head, before training
    code, _, err = cli("finetune", "--out", str(tmp_path / "run"), "--data", str(data), *TINY_ARGS)
    assert code == 2 and "No space left on device writing" in _one_line(err)


def test_model_file_with_hostile_metadata_is_one_line(tmp_path: Path, cli) -> None:
    from gmixout_cli.models.export import FORMAT

    meta = {"format": FORMAT, "library": "timm", "arch": "test_efficientnet", "num_classes": "3",
            "class_names": '["a", "b", "c"]', "image_size": "32", "mean": "[" * 100_000, "std": "[0.5, 0.5, 0.5]",
            "normalize_features": "false"}
    path = tmp_path / "model.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    code, _, err = cli("evaluate", str(path), "--data", str(tmp_path))
    assert code == 2 and "has damaged metadata 'mean'" in _one_line(err)
