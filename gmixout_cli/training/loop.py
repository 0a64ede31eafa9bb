"""The training loop: one loop for every method; methods differ only behind `Method`.

    gmixout finetune --model vit_b16_clip --data ./domainnet/sketch
    gmixout finetune --recipe quickstart
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from rich.console import Console

from gmixout_cli.config import Config, config_to_dict
from gmixout_cli.data import (
    build_transform, load_domain, make_loader, make_train_loader, sibling_domains, verify_domain_data,
)
from gmixout_cli.errors import Interrupted, UserError
from gmixout_cli.eval import autocast, evaluate_domains, ood_sets
from gmixout_cli.methods import Method, make_method
from gmixout_cli.methods.base import set_norm_stats
from gmixout_cli.models import BuiltModel, build_model, resolve_targets, save_classifier
from gmixout_cli.training.checkpoint import CHECKPOINT, load_checkpoint, save_checkpoint
from gmixout_cli.training.linear_probe import extract_features, fit_linear_probe
from gmixout_cli.training.schedule import make_scheduler
from gmixout_cli.training.signals import stop_on_signals
from gmixout_cli.training.steplog import StepLogger
from gmixout_cli.utils.io import save_safetensors, write_json
from gmixout_cli.utils.memory import peak_memory_bytes, resolve_device


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

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        """Forward, backward, the method's gradient hand-over, clip, the optimizers, the method's step end."""
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        total = 0.0
        for xc, yc in zip(x.split(self.micro_batch_size or len(x)), y.split(self.micro_batch_size or len(y))):
            with autocast(self.device, self.precision):
                loss = F.cross_entropy(self.model(xc), yc) * (len(yc) / len(y))  # mean over the whole batch
            loss.backward()  # gradients accumulate (GMixout's hooks gather each micro-batch's)
            total += loss.item()
        self.method.after_backward()
        if self.grad_clip:
            params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        for sched in self.schedulers:
            sched.step()
        self.step += 1
        self.method.after_step(self.step)
        return total

    @property
    def lr(self) -> float:
        """The current learning rate of the first group (the backbone's or the delta's)."""
        return self.optimizers[0].param_groups[0]["lr"]


def make_trainer(cfg: Config, built: BuiltModel, device: torch.device, total_steps: int) -> Trainer:
    """Wrap the model with its method, optimizers and schedule."""
    if cfg.train.grad_checkpointing:
        enable_grad_checkpointing(built, cfg.model.name)
    targets = resolve_targets(built, cfg.model.targets)
    method = make_method(cfg, built.model, targets, built.head_prefix, total_steps)
    optimizers = method.optimizers()
    schedulers = [make_scheduler(o, total_steps, cfg.train.warmup_steps, cfg.train.schedule) for o in optimizers]
    method.set_train_mode(built.model)
    set_norm_stats(built.model, cfg.method.norm_stats, cfg.model.name)
    return Trainer(built.model, method, optimizers, schedulers, device, cfg.train.precision, cfg.train.grad_clip,
                   cfg.train.micro_batch_size)


def enable_grad_checkpointing(built: BuiltModel, name: str) -> None:
    """Turn on the library's own activation checkpointing (open_clip's visual tower, timm models)."""
    module = getattr(built.model, "visual", built.model)
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


def finetune(cfg: Config, run_dir: Path, console: Console, resume: bool = False) -> dict[str, Any]:
    """Train (or continue from run_dir's checkpoint), export the merged dense model, evaluate in and out of
    domain; returns results.json's content."""
    t = cfg.train
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    device = resolve_device(t.device)
    data = load_domain(cfg.data)
    # every image and every class set is checked now, not after an hour of training
    data, skipped = verify_domain_data(data, cfg.data.unreadable, cfg.data.num_workers)
    ood, skipped_ood = ood_sets(data, sibling_domains(data, cfg.data.ood), cfg.data.unreadable, cfg.data.num_workers)
    model_cfg = cfg.model
    if cfg.method.name == "lpft" and model_cfg.head_init == "auto":  # LP-FT: the head starts from a linear probe
        model_cfg = dataclasses.replace(model_cfg, head_init="linear_probe")
    built = build_model(model_cfg, data.classes, t.seed)
    built.model.to(device)
    image_size = input_size(cfg, built)
    eval_tf = build_transform(image_size, built.mean, built.std, train=False)
    train_tf = build_transform(image_size, built.mean, built.std, True, cfg.data.hflip, cfg.data.crop_scale)
    loader, sampler = make_train_loader(data.train, train_tf, t.batch_size, cfg.data.num_workers, t.seed,
                                        drop_last=len(data.train) > t.batch_size)
    total_steps = min(t.epochs * len(sampler), t.max_steps or math.inf)
    note = f"; [yellow]skipped {skipped + skipped_ood} unreadable images[/]" if skipped + skipped_ood else ""
    console.print(f"[bold]data[/] {data.domain}: {len(data.train)} train / {len(data.val)} val images, "
                  f"{len(data.classes)} classes ({data.split_source}); out-of-domain: {', '.join(ood) or 'none'}{note}")

    lp_acc = None
    if built.head_init == "linear_probe" and not resume:  # a resumed run's head comes from its checkpoint
        feat_loader = make_loader(data.train, eval_tf, t.eval_batch_size, False, cfg.data.num_workers, 0)
        built.model.eval()
        feats, labels = extract_features(built.features, feat_loader, device)
        lp_acc = fit_linear_probe(built.head, feats, labels)
        console.print(f"[bold]head[/] linear probe on frozen features: train top-1 {lp_acc:.3f}")
    if not resume:
        head_state = {k: v.detach().cpu().contiguous() for k, v in built.head.state_dict().items()}
        save_safetensors(run_dir / "init_head.safetensors", head_state,
                         {"head_prefix": built.head_prefix, "head_init": built.head_init})

    trainer = make_trainer(cfg, built, device, total_steps)
    progress = {"epoch": 0, "batch": 0}
    if resume:
        progress = load_checkpoint(run_dir / CHECKPOINT, trainer)["progress"]
        console.print(f"[bold]resumed[/] from {run_dir / CHECKPOINT} at step {trainer.step}")
    summary = trainer.method.summary()
    console.print(f"[bold]train[/] {cfg.method.name}: {total_steps} steps of {t.batch_size} images on {device}; "
                  + ", ".join(f"{k}={v}" for k, v in summary.items()))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with stop_on_signals() as stop, StepLogger(run_dir, console, total_steps, trainer.step, t.log_every,
                                               t.batch_size, t.tensorboard) as log:
        while trainer.step < total_steps:
            sampler.set_epoch(progress["epoch"], progress["batch"])
            for x, y in loader:
                loss = trainer.train_step(x, y)
                progress["batch"] += 1
                if not math.isfinite(loss):
                    raise UserError(f"loss became {loss} at step {trainer.step}: lower train.lr or use "
                                    "train.precision=fp32 (the last checkpoint, if any, is intact)")
                log.step(trainer.step, progress["epoch"] + 1, loss, trainer.lr, peak_memory_bytes(device), y.numel())
                if progress["batch"] == len(sampler):
                    progress = {"epoch": progress["epoch"] + 1, "batch": 0}
                if stop.requested or (t.checkpoint_every and trainer.step % t.checkpoint_every == 0):
                    path = save_checkpoint(run_dir, trainer, progress, cfg)
                    if stop.requested:
                        raise Interrupted(f"stopped by {stop.requested} at step {trainer.step}; checkpoint {path}; "
                                          f"continue with `gmixout finetune --resume {run_dir}`")
                if trainer.step >= total_steps:
                    break
        train_time, images = log.elapsed(), log.images
    trainer.method.finish()
    built.model.eval()

    weights_path = run_dir / "model.safetensors"
    save_classifier(weights_path, built, data.classes, image_size,
                    extra={"config": json.dumps(config_to_dict(cfg)), "method": cfg.method.name})
    console.print(f"[bold]saved[/] merged dense model to {weights_path}")
    scores = evaluate_domains(built.model, data, ood, eval_tf, t.eval_batch_size, cfg.data.num_workers, device,
                              t.precision, on_domain=lambda d, a: console.print(f"  top-1 {d}: {a:.4f}"))
    results = {
        "model": cfg.model.name, "method": cfg.method.name, **scores,
        "steps": total_steps, "train_time_s": train_time,
        "images_per_s": images / max(train_time, 1e-9), "peak_memory_bytes": peak_memory_bytes(device),
        "device": str(device), "image_size": image_size, "method_summary": summary,
        "linear_probe_train_top1": lp_acc, "skipped_unreadable": skipped + skipped_ood,
        "split": data.split_source, "weights": str(weights_path),
    }
    write_json(run_dir / "results.json", results)
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: model.safetensors supersedes it
    return results

