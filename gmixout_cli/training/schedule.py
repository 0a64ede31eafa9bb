"""Learning-rate schedule: linear warm-up, then cosine to zero (or constant), global over all steps."""

from __future__ import annotations

import math

import torch


def make_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int, kind: str
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR multiplying each group's peak lr."""

    def factor(step: int) -> float:
        if warmup_steps and step < warmup_steps:
            return (step + 1) / warmup_steps
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
