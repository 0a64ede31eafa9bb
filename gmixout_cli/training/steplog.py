"""Per-step metrics: metrics.jsonl, optional TensorBoard, and a progress bar with ETA (or log lines)."""

from __future__ import annotations

import time
from pathlib import Path
from types import TracebackType
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from gmixout_cli.errors import UserError
from gmixout_cli.utils.io import append_jsonl


class StepLogger:
    """Averages the loss over `log_every` steps and writes one record per window."""

    def __init__(self, run_dir: Path, console: Console, total_steps: int, start_step: int, log_every: int,
                 batch_size: int, tensorboard: bool, record: bool = True) -> None:
        self.path = run_dir / "metrics.jsonl" if record else None  # other ranks than 0 record nothing
        self.console, self.total, self.log_every, self.batch_size = console, total_steps, log_every, batch_size
        self.writer = _tensorboard_writer(run_dir) if tensorboard else None
        self.start = self.window_start = time.perf_counter()
        self.window_loss, self.window_n, self.images = 0.0, 0, 0
        # a bar where a person watches; plain lines in logs and CI
        self.progress = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=console, transient=True,
        ) if console.is_terminal else None
        self.task = self.progress.add_task("train", total=total_steps, completed=start_step, loss="-") \
            if self.progress else None

    def __enter__(self) -> StepLogger:
        if self.progress:
            self.progress.start()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.progress:
            self.progress.stop()
        if self.writer:
            self.writer.close()

    def step(self, step: int, epoch: int, loss: float, lr: float, memory_bytes: int, images: int,
             comm_bytes: int | None = None) -> None:
        """Account one optimizer step; write a record at the end of each window and at the last step.
        `comm_bytes`: gradient bytes this rank all-reduced in the step (several processes)."""
        self.window_loss, self.window_n, self.images = self.window_loss + loss, self.window_n + 1, self.images + images
        if self.progress and self.task is not None:
            self.progress.update(self.task, completed=step, loss=f"{loss:.4f}")
        if step % self.log_every and step != self.total:
            return
        now = time.perf_counter()
        record: dict[str, Any] = {
            "step": step, "epoch": epoch, "loss": self.window_loss / self.window_n, "lr": lr,
            "images_per_s": self.window_n * self.batch_size / max(now - self.window_start, 1e-9),
            "memory_bytes": memory_bytes, "elapsed_s": now - self.start,
        }
        if comm_bytes is not None:
            record["comm_bytes_per_step"] = comm_bytes
        if self.path is not None:
            append_jsonl(self.path, record)
        if self.writer:
            for key in ("loss", "lr", "images_per_s", "memory_bytes"):
                self.writer.add_scalar(f"train/{key}", record[key], step)
        if not self.progress:
            self.console.print(f"step {step:>6}/{self.total}  loss {record['loss']:.4f}  lr {lr:.2e}  "
                               f"{record['images_per_s']:.1f} img/s")
        self.window_start, self.window_loss, self.window_n = now, 0.0, 0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


def _tensorboard_writer(run_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UserError("train.tensorboard=true needs the tensorboard package: pip install tensorboard "
                        "(or set train.tensorboard=false)") from None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
