"""Shared fixtures: small learnable image domains written on the fly."""

from __future__ import annotations

import os

# Triton kernels run on CPU tensors through the interpreter; it is chosen when a kernel is defined (import time).
os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests read local files only; the hub library reads this at import, so a download fails at once, not after retries.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

COLORS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def write_domains(root: Path, domains: tuple[str, ...] = ("src", "tgt"), per_class: int = 12, size: int = 32) -> Path:
    """ROOT/<domain>/<class>/<i>.png: class = dominant colour plus noise, so a model can learn it."""
    rng = np.random.default_rng(0)
    for d_index, domain in enumerate(domains):
        for name, color in COLORS.items():
            for i in range(per_class):
                base = np.array(color, dtype=np.float32) * (1.0 - 0.25 * d_index)  # darker sibling: a shift
                img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
                path = root / domain / name / f"{i:03d}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                Image.fromarray(img).save(path)
    return root


@pytest.fixture
def domains(tmp_path: Path) -> Path:
    """A source domain `src` and a shifted sibling `tgt`, 3 colour classes, 12 images each."""
    return write_domains(tmp_path / "data")


TINY_ARGS = ["--model", "timm:test_efficientnet", "model.weights=random", "data.image_size=32", "train.epochs=2",
             "train.batch_size=8", "data.num_workers=0", "train.log_every=1", "train.lr=1e-3",
             "train.warmup_steps=0", "train.eval_batch_size=16", "train.deterministic=true"]


@pytest.fixture
def cli(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):
    """Run the real console entry point in this process: returns (exit code, stdout, stderr)."""
    import sys
    import warnings

    from gmixout_cli.cli.app import main

    monkeypatch.setenv("COLUMNS", "300")
    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)  # main() replaces it; restored after

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["gmixout", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out, err = capsys.readouterr()
        return code, out, err

    return run


def build_method(name: str, model, targets: list[str], *, lr: float, head_lr: float | None = None,  # noqa: ANN001
                 weight_decay: float, seed: int = 0, default_targets: bool = False, total_steps: int = 1,
                 **fields: object):
    """A method built as the trainer builds it: from a validated config (`fields` are its `method.*`)."""
    from gmixout_cli.config import build_config
    from gmixout_cli.methods import make_method

    cfg = build_config({
        "model": {"targets": None if default_targets else list(targets)},
        "train": {"lr": lr, "head_lr": head_lr, "weight_decay": weight_decay, "seed": seed},
        "method": {"name": name, **fields},
    })
    return make_method(cfg, model, list(targets), "head", total_steps)


def finetune_command(*args: str) -> list[str]:
    """`gmixout finetune ARGS` as a subprocess runs it: the real entry point, signals and exit codes included."""
    import sys

    return [sys.executable, "-m", "gmixout_cli", "finetune", *args]


# `gmixout finetune` that stops itself (SIGSTOP) right after it logged step AT: a test then signals it at a
# known step, however fast the machine, and continues it with SIGCONT
_PAUSED = """
import os, signal
from gmixout_cli.cli.app import main
from gmixout_cli.training.steplog import StepLogger

logged = StepLogger.step

def step(self, n, *args, **kwargs):
    logged(self, n, *args, **kwargs)
    if n == {at}:
        os.kill(os.getpid(), signal.SIGSTOP)

StepLogger.step = step
main()
"""


def finetune_paused_at(at: int, *args: str) -> list[str]:
    """`finetune_command(*args)` that holds itself stopped after step `at`; see `wait_stopped`."""
    import sys

    return [sys.executable, "-c", _PAUSED.format(at=at), "finetune", *args]


def wait_stopped(proc: subprocess.Popen[Any], timeout: float = 240) -> None:
    """Wait until `proc` holds itself stopped (Linux /proc); fail if it exits or the timeout passes first."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "T":
            return
        time.sleep(0.02)
    raise AssertionError(f"the run never reached its pause (exit code {proc.poll()})")


def subprocess_env() -> dict[str, str]:
    """The environment of those subprocesses: offline, one thread each (two may share this machine), wide lines."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", COLUMNS="300")


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found
