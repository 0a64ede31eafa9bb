"""How long a comparison will take, from a few timed training steps per method on this machine.

Per run: planned steps x the timed step, plus every image the run decodes (the up-front check) and
scores (the linear probe's features, the held-out and out-of-domain evaluation) x the timed costs of
decoding one image (spread over the loader's workers) and of scoring it in a warm evaluation batch.
Grid extensions (a best value at an edge) add runs the plan cannot know in advance.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from gmixout_cli.compare.plan import Plan, Row
from gmixout_cli.config import Config
from gmixout_cli.data import (
    build_transform,
    load_domain,
    load_eval_domain,
    make_train_loader,
    read_image,
    sibling_domains,
)
from gmixout_cli.eval import autocast
from gmixout_cli.methods.registry import method_model_config
from gmixout_cli.models import build_model
from gmixout_cli.training import input_size, make_trainer
from gmixout_cli.utils.memory import resolve_device


@dataclass
class Timing:
    step_s: float  # one optimizer step
    decode_s: float  # reading and transforming one image (the up-front check does only this)
    forward_s: float  # scoring one image in an evaluation batch, warm


def time_row(cfg: Config, steps: int = 4) -> Timing:
    """Time `steps` training steps (after one warm-up) of the row's method on the domain's own batches, the
    decoding of a sample of the training images, and a warm evaluation batch."""
    device = resolve_device(cfg.train.device)
    data = load_domain(cfg.data)
    built = build_model(method_model_config(cfg), data.classes, cfg.train.seed)
    built.model.to(device)
    size = input_size(cfg, built)
    trainer = make_trainer(cfg, built, device, steps + 1)
    # real batches through the run's own loader: its workers decode and augment beside the step, as in a run
    train_tf = build_transform(size, built.mean, built.std, True, cfg.data.hflip, cfg.data.crop_scale)
    loader, _ = make_train_loader(data.train, train_tf, cfg.train.batch_size, cfg.data.num_workers,
                                  cfg.train.seed, drop_last=len(data.train) > cfg.train.batch_size)
    batches = iter(loader)
    trainer.train_step(*next(batches))  # warm-up: worker start, allocator, optimizer state
    t0 = time.perf_counter()
    timed = 0
    for x, y in batches:
        trainer.train_step(x, y)
        timed += 1
        if timed == steps:
            break
    step_s = (time.perf_counter() - t0) / max(timed, 1)
    del batches, loader
    built.model.eval()
    tf = build_transform(size, built.mean, built.std, train=False)
    sample = data.train[:: max(1, len(data.train) // 32)][:32]
    t0 = time.perf_counter()
    for path, _ in sample:
        tf(read_image(path))
    decode_s = (time.perf_counter() - t0) / len(sample)
    batch = torch.randn(cfg.train.eval_batch_size, 3, size, size, device=device)
    with torch.no_grad(), autocast(device, cfg.train.precision):
        built.model(batch)  # warm-up: the first batch pays one-time costs
        t0 = time.perf_counter()
        built.model(batch)
    forward_s = (time.perf_counter() - t0) / len(batch)
    # loader workers decode in parallel with the model
    workers = max(1, cfg.data.num_workers)
    return Timing(step_s, decode_s / workers, forward_s)


def images_per_run(cfg: Config) -> tuple[int, int, int]:
    """Images of a run besides training: (checked once up front, scored by the probe's features and the
    evaluation, scored by one evaluation: held-out and siblings, as each WiSE-FT alpha does)."""
    data = load_domain(cfg.data)
    ood = sum(len(load_eval_domain(data, d)) for d in sibling_domains(data, cfg.data.ood))
    own = len(data.train) + len(data.val)
    return own + ood, own + len(data.val) + ood, len(data.val) + ood


def measured_step_s(runs: Path) -> dict[str, float]:
    """Per method, the median seconds per training step of the finished runs under `runs` (a comparison that
    continues knows its own pace better than a few timed steps)."""
    paces: dict[str, list[float]] = {}
    for path in runs.glob("*/*/results.json"):
        try:
            r = json.loads(path.read_text())
            paces.setdefault(str(r["method"]), []).append(float(r["train_time_s"]) / int(r["steps"]))
        except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
            continue
    return {m: statistics.median(v) for m, v in paces.items()}


def estimate(plan: Plan, steps_per_run: int, pending: dict[str, int],
             measured: dict[str, float] | None = None) -> dict[str, float]:
    """Seconds per row for its `pending` runs (and WiSE-FT evaluations), from timings on this machine; a method's
    step time from `measured` (finished runs) where given."""
    out: dict[str, float] = {}
    timings: dict[str, Timing] = {}
    checked, scored, evaluated = images_per_run(_row_cfg(plan, plan.rows[0]))  # one domain folder for every row
    for row in plan.rows:
        cfg = _row_cfg(plan, row)
        if cfg.method.name not in timings:
            timings[cfg.method.name] = time_row(cfg)
            if measured and cfg.method.name in measured:
                timings[cfg.method.name].step_s = measured[cfg.method.name]
        t = timings[cfg.method.name]
        per_image = t.decode_s + t.forward_s
        seconds = pending[row.label] * (steps_per_run * t.step_s + checked * t.decode_s + scored * per_image)
        if plan.gets_wise(row.label):
            seconds += len(plan.seeds) * (len(plan.alphas) - 1) * evaluated * per_image
        out[row.label] = seconds
    return out


def _row_cfg(plan: Plan, row: Row) -> Config:
    return plan.config(row, row.grid[len(row.grid) // 2], plan.seeds[0])
