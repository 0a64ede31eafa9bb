"""One optimizer step for every method; methods differ only behind `Method`."""

from __future__ import annotations

import contextlib
import warnings
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
from gmixout_cli.training.distributed import SINGLE, Dist, all_reduce_grads
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
    dist: Dist = SINGLE
    global_batch: int | None = None
    """Images per optimizer step over all ranks (several processes: a rank's batch is its share of it)."""
    ddp: Any = None
    """The DDP wrapper that synchronises a dense method's gradients during backward (several processes)."""
    comm_bytes: int = 0
    """Gradient bytes each rank all-reduced in the last step (0 in one process)."""
    on_phase: Callable[[str], None] | None = None
    """Called with each phase's name as it ends: "forward" and "backward" (once per micro-batch),
    "after_backward", "clip", "optimizer", "after_step". The step benchmarks time and sample memory
    through it; with None (the default) each boundary costs one call of a no-op function."""

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, backward, the method's gradient hand-over, clip, the optimizers, the method's step end.

        With several processes `x` is this rank's share of a global batch of `global_batch` images; the
        returned loss is this rank's share of the global mean (`Dist.agree` sums it)."""
        phase = self.on_phase or _no_phase
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total = 0.0
        n = self.global_batch if self.dist.enabled and self.global_batch else len(y)
        chunks = list(zip(x.split(self.micro_batch_size or len(x)), y.split(self.micro_batch_size or len(x)),
                          strict=True))
        forward = self.ddp or self.model
        # DDP averages over ranks where the global mean needs their sum: its loss is scaled back up
        scale = self.dist.world if self.ddp is not None else 1
        for i, (xc, yc) in enumerate(chunks):
            sync = self.ddp is None or i == len(chunks) - 1  # DDP reduces once, with the last micro-batch
            with contextlib.nullcontext() if sync else self.ddp.no_sync():
                with autocast(self.device, self.precision):  # the forward pass only, as autocast asks
                    loss = F.cross_entropy(forward(xc), yc) * (len(yc) / n)  # this chunk's share of the batch mean
                phase("forward")
                (loss * scale if scale != 1 else loss).backward()  # gradients accumulate over micro-batches
            total += loss.item() if not loss.is_meta else 0.0  # meta: `gmixout profile --predict`
            phase("backward")
        self.method.after_backward()
        if self.dist.enabled and self.ddp is None:  # GMixout: only the sparse delta gradients and the head
            self.comm_bytes = all_reduce_grads(
                [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]])
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


def make_trainer(cfg: Config, built: BuiltModel, device: torch.device, total_steps: int,
                 dist: Dist = SINGLE) -> Trainer:
    """Wrap the model with its method, optimizers and schedule (and DDP, for a dense method on several ranks)."""
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(built, cfg.model.name)
    targets = resolve_targets(built, cfg.model.targets)
    method = make_method(cfg, built.model, targets, built.head_prefix, total_steps)
    optimizers = method.optimizers()
    schedulers: list[torch.optim.lr_scheduler.LRScheduler] = [
        make_scheduler(o, total_steps, cfg.train.warmup_steps, cfg.train.schedule) for o in optimizers]
    method.set_train_mode(built.model)
    set_norm_stats(built.model, cfg.method.norm_stats, cfg.model.name)
    trainer = Trainer(built.model, method, optimizers, schedulers, device, cfg.train.precision, cfg.train.grad_clip,
                      cfg.train.micro_batch_size, dist=dist)
    if dist.enabled:
        dist.broadcast_state(built.model)
        if method.dense_sync:
            trainer.ddp = _ddp(built.model, device)
            trainer.comm_bytes = sum(p.numel() * p.element_size() for p in built.model.parameters()
                                     if p.requires_grad)
    return trainer


def _ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules()):
        warnings.warn("method.norm_stats=update on several processes: each rank's BatchNorm statistics follow its "
                      "own share of the batch, and rank 0's are exported", stacklevel=3)
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


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
