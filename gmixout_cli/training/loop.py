"""One optimizer step for every method; methods differ only behind `Method`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from gmixout_cli.config import Config
from gmixout_cli.errors import UserError
from gmixout_cli.eval import autocast
from gmixout_cli.methods import Method, make_method
from gmixout_cli.methods.base import set_norm_stats
from gmixout_cli.models import BuiltModel, resolve_targets
from gmixout_cli.training.schedule import make_scheduler


@dataclass
class Trainer:
    """Everything one optimizer step needs; shared by `finetune` and `profile`."""

    model: torch.nn.Module
    method: Method
    optimizers: list[torch.optim.Optimizer]
    schedulers: list[torch.optim.lr_scheduler.LRScheduler]
    device: torch.device
    precision: str
    grad_clip: float | None
    micro_batch_size: int | None = None
    step: int = 0
    on_phase: Callable[[str], None] | None = None
    """Called with each phase's name as it ends: "forward" and "backward" (once per micro-batch),
    "after_backward", "clip", "optimizer", "after_step". The step benchmarks time and sample memory
    through it; with None (the default) each boundary costs one call of a no-op function."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, backward, the method's gradient hand-over, clip, the optimizers, the method's step end."""
        phase = self.on_phase or _no_phase
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total = 0.0
        chunk = self.micro_batch_size or len(x)
        for xc, yc in zip(x.split(chunk), y.split(chunk), strict=True):
            with autocast(self.device, self.precision):
                loss = F.cross_entropy(self.model(xc), yc) * (len(yc) / len(y))  # mean over the whole batch
            phase("forward")
            loss.backward()  # gradients accumulate (GMixout's hooks gather each micro-batch's)
            total += loss.item()
            phase("backward")
        self.method.after_backward()
        phase("after_backward")
        if self.grad_clip:
            params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        phase("clip")
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers:
            sched.step()
        phase("optimizer")
        self.step += 1
        self.method.after_step(self.step)
        phase("after_step")
        return total

    @property
    def lr(self) -> float:
        """The current learning rate of the first group (the backbone's or the delta's)."""
        return self.optimizers[0].param_groups[0]["lr"]


def _no_phase(name: str) -> None:
    """The phase callback when nobody listens."""


def make_trainer(cfg: Config, built: BuiltModel, device: torch.device, total_steps: int) -> Trainer:
    """Wrap the model with its method, optimizers and schedule."""
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(built, cfg.model.name)
    targets = resolve_targets(built, cfg.model.targets)
    method = make_method(cfg, built.model, targets, built.head_prefix, total_steps)
    optimizers = method.optimizers()
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = [
        make_scheduler(o, total_steps, cfg.train.warmup_steps, cfg.train.schedule) for o in optimizers]
    method.set_train_mode(built.model)
    set_norm_stats(built.model, cfg.method.norm_stats, cfg.model.name)
    return Trainer(built.model, method, optimizers, schedulers, device, cfg.train.precision, cfg.train.grad_clip,
                   cfg.train.micro_batch_size)


def enable_grad_checkpointing(built: BuiltModel, name: str) -> None:
    """Turn on the library's own activation checkpointing (open_clip's visual tower, timm models)."""
    module: Any = getattr(built.model, "visual", built.model)
    if not hasattr(module, "set_grad_checkpointing"):
        raise UserError(f"{name} has no activation checkpointing: set train.grad_checkpointing=false "
                        "and lower train.micro_batch_size instead")
    module.set_grad_checkpointing(True)


def input_size(cfg: Config, built: BuiltModel) -> int:
    """The training resolution: data.image_size, or the model's own; ViTs only run at their own."""
    size = cfg.data.image_size or built.image_size
    if built.family == "vit" and size != built.image_size:
        raise UserError(f"{cfg.model.name} has position embeddings for {built.image_size} px only: "
                        f"set data.image_size={built.image_size} or null")
    return size
