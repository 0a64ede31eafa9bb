"""Step metrics: records per window, a progress bar on terminals, plain lines elsewhere, TensorBoard on request."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from gmixout_cli.errors import UserError
from gmixout_cli.training.steplog import StepLogger


@pytest.mark.parametrize("terminal", [True, False])
def test_records_every_window_and_the_last_step(tmp_path: Path, terminal: bool) -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=terminal, width=120)
    with StepLogger(tmp_path, console, total_steps=5, start_step=0, log_every=2, batch_size=4,
                    tensorboard=False) as log:
        for step in range(1, 6):
            log.step(step, 1, loss=float(step), lr=1e-3, memory_bytes=10, images=4)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4, 5]
    assert records[0]["loss"] == 1.5 and records[2]["loss"] == 5.0
    assert log.images == 20
    assert ("step      2/5" in out.getvalue()) is not terminal  # lines only where no bar is drawn


def test_tensorboard_scalars_or_a_clear_error(tmp_path: Path) -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install tensorboard"):
            StepLogger(tmp_path, Console(quiet=True), 2, 0, 1, 4, tensorboard=True)
        return
    with StepLogger(tmp_path, Console(quiet=True), 2, 0, 1, 4, tensorboard=True) as log:
        log.step(1, 1, 0.5, 1e-3, 0, 4)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
