"""Progress over a whole comparison: optimizer steps of every planned run, with an ETA from the pace so far.

The pace is the wall time per step of the runs trained in this process (set-up and evaluation included),
so the ETA covers them too; runs already finished on disk count as done and take no time.
"""

from __future__ import annotations

import time
from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def clock(seconds: float) -> str:
    """3725 -> '1h02m', 95 -> '1m35s'."""
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


class PlanProgress:
    """A bar over the plan's steps where a person watches; ETA notes on each run's line elsewhere."""

    def __init__(self, console: Console, steps_per_run: int) -> None:
        self.console, self.steps_per_run = console, steps_per_run
        self.total = self.done = 0
        self.run_steps = 0  # steps of the current run counted so far
        self.resumed_steps = 0  # of those, the ones a checkpoint had already done (no time spent on them here)
        self.trained_steps, self.trained_time = 0, 0.0
        self.run_started: float | None = None
        self.started = time.perf_counter()
        self.bar = Progress(TextColumn("[bold]compare[/] {task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("steps"), TimeElapsedColumn(), TextColumn("{task.fields[eta]}"),
                            console=console, transient=True) if console.is_terminal else None
        self.task = self.bar.add_task("", total=1, eta="") if self.bar else None

    def __enter__(self) -> PlanProgress:
        if self.bar:
            self.bar.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self.bar:
            self.bar.stop()

    def plan(self, finished: list[bool]) -> None:
        """The runs known now; those already finished count as done."""
        self.total = len(finished) * self.steps_per_run
        self.done = sum(finished) * self.steps_per_run
        self._refresh()

    def add_runs(self, n: int, finished: bool = False) -> None:
        """Runs a grown grid adds; a continuing comparison may have finished them already."""
        self.total += n * self.steps_per_run
        if finished:
            self.done += n * self.steps_per_run
        self._refresh()

    def start_run(self, description: str) -> None:
        self.run_started, self.run_steps, self.resumed_steps = time.perf_counter(), 0, 0
        if self.bar and self.task is not None:
            self.bar.update(self.task, description=description)

    def step(self, step: int, total: int) -> None:
        """`on_step` of the pipeline: a resumed run reports its first step > 1, counted from there."""
        if self.run_steps == 0 and step > 1:
            self.done += step - 1
            self.run_steps = self.resumed_steps = step - 1
        self.done += 1
        self.run_steps += 1
        self._refresh()

    def end_run(self) -> None:
        """Close the run's account: its wall time (evaluation included) feeds the pace."""
        if self.run_started is not None and self.run_steps > self.resumed_steps:
            self.trained_steps += self.run_steps - self.resumed_steps
            self.trained_time += time.perf_counter() - self.run_started
            self.done += self.steps_per_run - self.run_steps  # runs that stop early (max_steps) still complete
        self.run_started, self.run_steps = None, 0
        self._refresh()

    def eta(self) -> float | None:
        """Seconds left at the pace of the runs trained so far (None before the first one ends)."""
        if not self.trained_steps:
            return None
        return max(0, self.total - self.done) * self.trained_time / self.trained_steps

    def eta_note(self) -> str:
        eta = self.eta()
        left = max(0, self.total - self.done) // max(1, self.steps_per_run)
        return f"  [{left} runs left, ETA {clock(eta)}]" if eta is not None and left else ""

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def _refresh(self) -> None:
        if self.bar and self.task is not None:
            eta = self.eta()
            self.bar.update(self.task, total=max(1, self.total), completed=min(self.done, self.total),
                            eta=f"ETA {clock(eta)}" if eta is not None else "ETA after the first run")
