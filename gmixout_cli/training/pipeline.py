"""A whole run: set-up, training, export, evaluation; every way it can be stopped keeps what it made.

    gmixout finetune --model vit_b16_clip --data ./domainnet/sketch
    gmixout finetune --recipe quickstart

Stop signals (see `utils.signals`): before training and during evaluation the run stops at once; while
training it finishes the step and writes a checkpoint; checkpoint and export writes always finish.
The last training step is checkpointed before the method's export transform, so a failed export
(full disk) or a stop during evaluation resumes without training again.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from torch.utils.data import DataLoader

from gmixout_cli.config import Config, config_to_dict
from gmixout_cli.data import (
    DomainData,
    build_transform,
    load_domain,
    make_loader,
    make_train_loader,
    sibling_domains,
    verify_domain_data,
)
from gmixout_cli.data.epochs import EpochBatches
from gmixout_cli.errors import Diverged, Interrupted, UserError
from gmixout_cli.eval import evaluate_domains, ood_sets
from gmixout_cli.methods.registry import method_model_config
from gmixout_cli.models import BuiltModel, build_model, save_classifier
from gmixout_cli.training.checkpoint import CHECKPOINT, load_checkpoint, read_checkpoint_meta, save_checkpoint
from gmixout_cli.training.distributed import SINGLE, Dist, check_batch
from gmixout_cli.training.linear_probe import ProbeFit, extract_features, fit_linear_probe
from gmixout_cli.training.loop import Trainer, input_size, make_trainer
from gmixout_cli.training.steplog import StepLogger
from gmixout_cli.utils.environment import environment
from gmixout_cli.utils.io import save_safetensors, write_json
from gmixout_cli.utils.memory import peak_memory_bytes, resolve_device
from gmixout_cli.utils.signals import StopFlag, StopNow, is_worker_loss, stop_on_signals, worker_deaths_between_steps


@dataclass
class Prepared:
    """What set-up hands to training: verified data, the built model and its trainer."""

    data: DomainData
    ood: dict[str, Any]
    built: BuiltModel
    trainer: Trainer
    loader: DataLoader
    sampler: EpochBatches
    progress: dict[str, int]
    total_steps: int
    image_size: int
    eval_tf: Any
    device: torch.device
    probe: ProbeFit | None
    skipped: int
    summary: dict[str, Any]


def finetune(cfg: Config, run_dir: Path, console: Console, resume: bool = False,
             on_step: Callable[[int, int], None] | None = None, dist: Dist = SINGLE) -> dict[str, Any]:
    """Train (or continue from run_dir's checkpoint), export the merged dense model, evaluate in and out of
    domain; returns results.json's content. `on_step(step, total_steps)` follows training (`gmixout compare`'s
    progress over many runs). With several processes (`dist`) every rank trains its share of each batch and
    rank 0 alone exports and evaluates; the other ranks return {} after training."""
    with stop_on_signals() as stop:
        try:
            with _worker_loss_explained("before training started; nothing was trained: run the same command again"):
                run = prepare(cfg, run_dir, console, resume, dist)
        except StopNow:
            raise Interrupted(f"stopped by {stop.requested} before training started; nothing was trained: run the "
                              "same command again", stop.exit_code) from None
        stop.immediate = False
        train_time, images = train(cfg, run_dir, console, run, stop, on_step)
        if not dist.main:
            return {}
        weights_path = export(cfg, run_dir, console, run, stop)
        stop.immediate = True
        try:
            with _worker_loss_explained(f"during evaluation; the model is saved at {weights_path}: `gmixout "
                                        f"finetune --resume {run_dir}` evaluates it"):
                results = evaluate(cfg, run_dir, console, run, weights_path)
        except StopNow:
            raise Interrupted(f"stopped by {stop.requested} during evaluation; the model is saved at {weights_path}: "
                              f"`gmixout finetune --resume {run_dir}` evaluates it", stop.exit_code) from None
    results.update(train_time_s=train_time, images_per_s=images / max(train_time, 1e-9))
    _write_or_explain(lambda: write_json(run_dir / "results.json", results), run_dir / "results.json",
                      f"the model is saved; `gmixout evaluate {run_dir}` scores it again")
    (run_dir / CHECKPOINT).unlink(missing_ok=True)  # the run is complete: model.safetensors supersedes it
    return results


def prepare(cfg: Config, run_dir: Path, console: Console, resume: bool, dist: Dist = SINGLE) -> Prepared:
    """Check every image, build the model (and its linear-probe head), the loader and the trainer."""
    t = cfg.train
    check_batch(dist, t.batch_size, t.micro_batch_size)
    torch.manual_seed(t.seed)
    if t.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    device = dist.device(resolve_device(t.device))
    data = load_domain(cfg.data)
    # every image and every class set is checked now, not after an hour of training
    data, skipped = verify_domain_data(data, cfg.data.unreadable, cfg.data.num_workers)
    ood, skipped_ood = ood_sets(data, sibling_domains(data, cfg.data.ood), cfg.data.unreadable, cfg.data.num_workers)
    built = build_model(method_model_config(cfg), data.classes, t.seed)
    built.model.to(device)
    image_size = input_size(cfg, built)
    eval_tf = build_transform(image_size, built.mean, built.std, train=False)
    train_tf = build_transform(image_size, built.mean, built.std, True, cfg.data.hflip, cfg.data.crop_scale)
    loader, sampler = make_train_loader(data.train, train_tf, t.batch_size, cfg.data.num_workers, t.seed,
                                        drop_last=len(data.train) > t.batch_size,
                                        shard=dist.shard if dist.enabled else None)
    total_steps = min(t.epochs * len(sampler), t.max_steps or t.epochs * len(sampler))
    skipped += skipped_ood
    note = f"; [yellow]skipped {skipped} unreadable images[/]" if skipped else ""
    console.print(f"[bold]data[/] {data.domain}: {len(data.train)} train / {len(data.val)} val images, "
                  f"{len(data.classes)} classes ({data.split_source}); out-of-domain: {', '.join(ood) or 'none'}{note}")

    probe = None
    if built.head_init == "linear_probe" and not resume:  # a resumed run's head comes from its checkpoint
        built.model.eval()

        def features(items: list) -> tuple[torch.Tensor, torch.Tensor]:
            loader = make_loader(items, eval_tf, t.eval_batch_size, False, cfg.data.num_workers, 0)
            return extract_features(built.features, loader, device)

        feats, labels = features(data.train)
        probe = fit_linear_probe(built.head, feats, labels, features(data.val) if data.val else None)
        held_out = f", held-out top-1 {probe.val_top1:.3f}" if probe.val_top1 is not None else ""
        console.print(f"[bold]head[/] linear probe on frozen features (l2={probe.l2:g}, chosen on the held-out "
                      f"split): train top-1 {probe.train_top1:.3f}{held_out}")
    if not resume and dist.main:
        head_state = {k: v.detach().cpu().contiguous() for k, v in built.head.state_dict().items()}
        save_safetensors(run_dir / "init_head.safetensors", head_state,
                         {"head_prefix": built.head_prefix, "head_init": built.head_init})

    trainer = make_trainer(cfg, built, device, total_steps, dist)
    progress = {"epoch": 0, "batch": 0}
    if resume:
        progress = load_checkpoint(run_dir / CHECKPOINT, trainer)["progress"]
        console.print(f"[bold]resumed[/] from {run_dir / CHECKPOINT} at step {trainer.step}")
    return Prepared(data, ood, built, trainer, loader, sampler, progress, total_steps, image_size, eval_tf, device,
                    probe, skipped, trainer.method.summary())


def train(cfg: Config, run_dir: Path, console: Console, run: Prepared, stop: StopFlag,
          on_step: Callable[[int, int], None] | None = None) -> tuple[float, int]:
    """The training steps; returns (seconds, images). A stop signal ends it with a checkpoint of the step."""
    t, trainer, progress = cfg.train, run.trainer, run.progress
    dist = trainer.dist
    ranks = f" ({dist.world} processes, {t.batch_size // dist.world} images each)" if dist.enabled else ""
    console.print(f"[bold]train[/] {cfg.method.name}: {run.total_steps} steps of {t.batch_size} images{ranks} on "
                  f"{run.device}; " + ", ".join(f"{k}={v}" for k, v in run.summary.items()))
    # a domain smaller than a batch is one batch of it all
    global_batch = trainer.global_batch = min(t.batch_size, len(run.data.train))
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)

    def checkpoint() -> Path:
        if not dist.main:  # every rank holds the same state: rank 0 writes it
            return run_dir / CHECKPOINT
        with stop.deferred():
            return save_checkpoint(run_dir, trainer, progress, cfg)

    def stop_every_rank(saved: Path | None = None) -> Interrupted:
        """Every rank stops after the same step: rank 0 writes its checkpoint (unless `saved` already holds it)
        while the others wait (one that exits first makes the launcher end the rest, rank 0 mid-write too)."""
        if not stop.requested:
            stop.requested, stop.signum = "a stop signal to another process", signal.SIGTERM
        path = saved or checkpoint()
        dist.barrier()
        return Interrupted(f"stopped by {stop.requested} at step {trainer.step}; checkpoint {path}; resume with "
                           f"`{dist.launch} --resume {run_dir}`", stop.exit_code)

    with StepLogger(run_dir, console, run.total_steps, trainer.step, t.log_every, t.batch_size,
                    t.tensorboard and dist.main, record=dist.main) as log, worker_deaths_between_steps():
        try:
            while trainer.step < run.total_steps:
                run.sampler.set_epoch(progress["epoch"], progress["batch"])
                for batch in _batches(run.loader, stop):
                    # every rank learns before the step whether one has no batch for it: the last step is whole
                    lost = batch if isinstance(batch, WorkerLost) else None
                    ended = dist.max(_LOST if lost else _STOPPED if batch is _LOADER_STOPPED else 0)
                    if ended == _LOST:
                        raise lost or WorkerLost("a data loader worker of another rank")
                    if ended == _STOPPED:
                        raise stop_every_rank()
                    x, y = batch
                    # the agreed flag alone decides: a signal that arrives after this all-reduce on one rank only
                    # is carried by the next step's, so that no rank leaves while the others wait for it
                    loss, stopping = dist.agree(trainer.train_step(x, y), bool(stop.requested))
                    progress["batch"] += 1
                    if not math.isfinite(loss):
                        raise Diverged(f"loss became {loss} at step {trainer.step}: lower train.lr or use "
                                        "train.precision=fp32 (the last checkpoint, if any, is intact)")
                    log.step(trainer.step, progress["epoch"] + 1, loss, trainer.lr, peak_memory_bytes(run.device),
                             global_batch,
                             comm_bytes=trainer.comm_bytes if dist.enabled else None)
                    if on_step and dist.main:
                        on_step(trainer.step, run.total_steps)
                    if progress["batch"] == len(run.sampler):
                        progress.update(epoch=progress["epoch"] + 1, batch=0)
                    saved = checkpoint() if t.checkpoint_every and trainer.step % t.checkpoint_every == 0 else None
                    if stopping or (stop.requested and not dist.enabled):  # one process: its own flag, at once
                        raise stop_every_rank(saved)
                    if trainer.step >= run.total_steps:
                        break
                # every rank ends the epoch together; a signal since the last step stops them all here
                if dist.any(bool(stop.requested)):
                    raise stop_every_rank()
        except WorkerLost as lost:  # between steps: the last one is whole
            path = checkpoint()
            dist.barrier()  # a rank that exits first makes the launcher end the others, rank 0 mid-write too
            raise UserError(f"{lost} exited unexpectedly at step {trainer.step} (killed: "
                            f"out of memory?); checkpoint {path}; once memory is free, resume with "
                            f"`{dist.launch} --resume {run_dir}` (data.num_workers=N after it sets fewer workers)"
                            ) from None
        except StopNow:
            raise Interrupted(f"stopped at once by a second {stop.requested} during step {trainer.step + 1}; "
                              f"{last_checkpoint_note(run_dir)}", stop.exit_code) from None
        return log.elapsed(), log.images


@contextlib.contextmanager
def _worker_loss_explained(where: str) -> Iterator[None]:
    """Outside training (checking images, the probe's features, evaluation) a loader worker killed on its own
    ends the phase at once: one line says what was kept, instead of torch's traceback."""
    try:
        yield
    except RuntimeError as exc:
        if not is_worker_loss(exc):
            raise
        raise UserError(f"a data loader worker exited unexpectedly {where} (killed: out of memory? "
                        "data.num_workers=N sets fewer workers)") from None


class WorkerLost(Exception):
    """A loader worker exited while the main process did not ask it to (the message names it)."""


_LOADER_STOPPED = object()
"""In the place of a batch: the loader ended because the stop signal reached its workers too."""
_STOPPED, _LOST = 1, 2  # what a rank has instead of a batch; the larger wins on every rank


def _batches(loader: DataLoader, stop: StopFlag) -> Iterator[Any]:
    """The loader's batches; when a loader worker is gone, one last item in the place of the next batch, so that
    every rank can learn of it before the step: _LOADER_STOPPED where the stop signal reached the worker too, a
    WorkerLost where it alone was killed (out of memory, a stray kill)."""
    try:
        # persistent workers: each epoch's first call waits for every worker; the very first installs torch's
        # SIGCHLD handler, which the block below sets aside
        batches = iter(loader)
        with worker_deaths_between_steps():
            yield from batches
    except RuntimeError as exc:
        if not is_worker_loss(exc):
            raise
        if stop.requested:  # a worker the signal reached before it could ignore it
            yield _LOADER_STOPPED
            return
        pids = re.search(r"\(pids?(?:\(s\))? ([^)]*)\)", str(exc))
        yield WorkerLost(f"a data loader worker (pid {pids.group(1) if pids else '?'})")


def export(cfg: Config, run_dir: Path, console: Console, run: Prepared, stop: StopFlag) -> Path:
    """Checkpoint the final step, apply the method's export transform, write model.safetensors."""
    trainer, weights_path = run.trainer, run_dir / "model.safetensors"
    with stop.deferred():
        try:
            save_checkpoint(run_dir, trainer, run.progress, cfg)
            kept = f"the checkpoint of the final step is kept: free space and `gmixout finetune --resume {run_dir}` " \
                   "exports without training again"
        except UserError as exc:  # the disk is full: the export may still fit (no optimizer moments in it)
            kept = f"{exc}"
        trainer.method.finish()
        run.built.model.eval()
        _write_or_explain(lambda: save_classifier(
            weights_path, run.built, run.data.classes, run.image_size,
            extra={"config": json.dumps(config_to_dict(cfg)), "method": cfg.method.name}), weights_path, kept)
    console.print(f"[bold]saved[/] merged dense model to {weights_path}")
    if stop.requested:
        raise Interrupted(f"stopped by {stop.requested} after training; the model is saved at {weights_path}: "
                          f"`gmixout finetune --resume {run_dir}` evaluates it", stop.exit_code)
    return weights_path


def evaluate(cfg: Config, run_dir: Path, console: Console, run: Prepared, weights_path: Path) -> dict[str, Any]:
    """In-domain and out-of-domain top-1 of the exported model; results.json's content (times added later)."""
    t = cfg.train
    scores = evaluate_domains(run.built.model, run.data, run.ood, run.eval_tf, t.eval_batch_size,
                              cfg.data.num_workers, run.device, t.precision,
                              on_domain=lambda d, a: console.print(f"  top-1 {d}: {a:.4f}"))
    return {
        "model": cfg.model.name, "method": cfg.method.name, **scores, "steps": run.total_steps,
        "train_time_s": 0.0, "images_per_s": 0.0, "peak_memory_bytes": peak_memory_bytes(run.device),
        "device": str(run.device), "image_size": run.image_size, "method_summary": run.summary,
        "linear_probe": dataclasses.asdict(run.probe) if run.probe else None, "skipped_unreadable": run.skipped,
        "split": run.data.split_source, "held_out_images": len(run.data.val), "world_size": run.trainer.dist.world,
        "weights": str(weights_path), "environment": environment(run.device),
    }


def last_checkpoint_note(run_dir: Path) -> str:
    """What a hard stop leaves: the step of the checkpoint on disk, or that there is none."""
    path = run_dir / CHECKPOINT
    if not path.is_file():
        return "no checkpoint was written (set train.checkpoint_every to keep one): nothing to resume"
    try:
        step = read_checkpoint_meta(path)["step"]
    except UserError:
        return f"{path} is not readable: nothing to resume"
    return f"the checkpoint of step {step} is kept: resume with `gmixout finetune --resume {run_dir}`"


def _write_or_explain(write: Callable[[], object], path: Path, kept: str) -> None:
    """Run a write; a full or read-only disk becomes one line saying what is kept."""
    try:
        write()
    except OSError as exc:
        reason = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        raise UserError(f"could not write {path}: {reason}; {kept}") from None
