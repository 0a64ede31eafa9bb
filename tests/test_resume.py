"""A run killed with SIGKILL and resumed ends bit-identical to an uninterrupted run (CPU, deterministic)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import finetune_command as _cmd
from conftest import finetune_paused_at as paused_at
from conftest import subprocess_env as _env
from conftest import wait_stopped, write_domains

pytestmark = pytest.mark.slow  # each test trains in subprocesses

ARGS = ["--model", "timm:test_efficientnet", "model.weights=random", "data.image_size=32", "train.epochs=3",
        "train.batch_size=8", "data.num_workers=1", "train.log_every=1", "train.lr=1e-3", "train.checkpoint_every=1",
        "train.deterministic=true", "train.warmup_steps=2", "method.p=0.8", "method.k=3"]


@pytest.mark.parametrize("method", ["gmixout", "full", "gmixout_bf16"])
def test_sigkill_then_resume_is_bit_identical(tmp_path: Path, method: str) -> None:
    data = write_domains(tmp_path / "data") / "src"
    own = ARGS if method.startswith("gmixout") else [a for a in ARGS if not a.startswith("method.")]  # full: no p, k
    if method == "gmixout_bf16":  # bf16 target weights: the fp32 anchor values travel in the checkpoint
        own = [*own, "method.weight_dtype=bf16", "train.precision=bf16"]
    args = ["--data", str(data), *own, f"method.name={method.removesuffix('_bf16')}"]
    full = subprocess.run(_cmd(*args, "--out", str(tmp_path / "whole")), env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert full.returncode == 0, full.stderr
    total = json.loads((tmp_path / "whole" / "results.json").read_text())["steps"]

    killed = tmp_path / "killed"
    kill_after = random.Random(method).randint(2, total - 2)
    proc = subprocess.Popen(paused_at(kill_after, *args, "--out", str(killed)), env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_stopped(proc)  # held right after step kill_after: a fast machine cannot finish the run before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "model.safetensors").exists()
    # a resume may change how the run is carried out (no loader workers, checkpoints every 2 steps), not what
    # it computes (train.lr is reported and left as it was)
    resumed = subprocess.run(_cmd("--resume", str(killed), "data.num_workers=0", "train.checkpoint_every=2",
                                  "train.lr=0.5"), env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout
    assert "train.lr: 0.001 (run) vs 0.5 (given)" in resumed.stderr and "num_workers" not in resumed.stderr.split(
        "(a resume may change only")[0]
    saved = (killed / "config.yaml").read_text()
    assert "num_workers: 0" in saved and "checkpoint_every: 2" in saved and "lr: 0.001" in saved
    ours, whole = load_file(killed / "model.safetensors"), load_file(tmp_path / "whole" / "model.safetensors")
    assert ours.keys() == whole.keys() and all(torch.equal(ours[k], whole[k]) for k in ours)  # bit-identical


def test_resume_refuses_finished_runs(tmp_path: Path) -> None:
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    args = ["--data", str(data), *ARGS, "train.epochs=1", "--out", str(run)]
    assert subprocess.run(_cmd(*args), env=_env(), capture_output=True, timeout=300).returncode == 0
    assert not (run / "checkpoint.safetensors").exists()  # superseded by model.safetensors
    again = subprocess.run(_cmd("--resume", str(run)), env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already finished" in again.stderr


def test_sigterm_writes_a_checkpoint_then_resume_finishes(tmp_path: Path) -> None:
    data = write_domains(tmp_path / "data") / "src"
    run = tmp_path / "run"
    args = ["--data", str(data), *ARGS, "train.checkpoint_every=100", "--out", str(run)]  # no periodic checkpoint
    proc = subprocess.Popen(paused_at(3, *args), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_stopped(proc)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err  # the shell's convention: 143
    assert "stopped by SIGTERM" in err and "--resume" in err and "Traceback" not in err
    assert (run / "checkpoint.safetensors").is_file() and not (run / "model.safetensors").exists()
    resumed = subprocess.run(_cmd("--resume", "auto"), env=_env(), capture_output=True, text=True, timeout=300,
                             cwd=tmp_path)
    assert resumed.returncode != 0 and "no unfinished run" in resumed.stderr  # auto looks under ./runs only
    resumed = subprocess.run(_cmd("--resume", str(run), "train.lr=0.5"), env=_env(), capture_output=True, text=True,
                             timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert "train.lr: 0.001 (run) vs 0.5 (given)" in resumed.stderr  # reported; the run's value is used
    assert (run / "model.safetensors").is_file()
