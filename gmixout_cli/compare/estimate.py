"""How long a comparison will take, from a few timed training steps per method on this machine.

Per run: planned steps x the timed step, plus every image the run decodes and scores (checked once,
the linear probe's features, the held-out and out-of-domain evaluation) x the timed per-image cost.
Grid extensions (a best value at an edge) add runs the plan cannot know in advance.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from gmixout_cli.compare.plan import Plan, Row
from gmixout_cli.config import Config
from gmixout_cli.data import build_transform, load_domain, load_eval_domain, read_image, sibling_domains
from gmixout_cli.methods.registry import method_model_config
from gmixout_cli.models import build_model
from gmixout_cli.training import input_size, make_trainer
from gmixout_cli.utils.memory import resolve_device


@dataclass
class Timing:
    step_s: float  # one optimizer step
    image_s: float  # decoding, transforming and scoring one image


def time_row(cfg: Config, steps: int = 3) -> Timing:
    """Time `steps` training steps (after one warm-up) of the row's method on random batches."""
    device = resolve_device(cfg.train.device)
    data = load_domain(cfg.data)
    built = build_model(method_model_config(cfg), data.classes, cfg.train.seed)
    built.model.to(device)
    size = input_size(cfg, built)
    trainer = make_trainer(cfg, built, device, steps + 1)
    b = cfg.train.batch_size
    x, y = torch.randn(b, 3, size, size), torch.randint(len(data.classes), (b,))
    trainer.train_step(x, y)
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    step_s = (time.perf_counter() - t0) / steps
    built.model.eval()
    tf = build_transform(size, built.mean, built.std, train=False)
    sample = data.train[:: max(1, len(data.train) // 16)][:16]
    t0 = time.perf_counter()
    batch = torch.stack([tf(read_image(path)) for path, _ in sample])
    with torch.no_grad():
        built.model(batch.to(device))
    return Timing(step_s, (time.perf_counter() - t0) / len(sample))


def images_per_run(cfg: Config) -> int:
    """Images a run decodes or scores besides training: the up-front check, probe features, evaluation."""
    data = load_domain(cfg.data)
    ood = sum(len(load_eval_domain(data, d)) for d in sibling_domains(data, cfg.data.ood))
    own = len(data.train) + len(data.val)
    return 2 * (own + ood) + own  # checked once, scored once (+ the probe's features of train and val)


def estimate(plan: Plan, steps_per_run: int, pending: dict[str, int], wise_images: int) -> dict[str, float]:
    """Seconds per row for its `pending` runs (and WiSE-FT evaluations), from timings on this machine."""
    out: dict[str, float] = {}
    timings: dict[str, Timing] = {}
    for row in plan.rows:
        cfg = _row_cfg(plan, row)
        if cfg.method.name not in timings:
            timings[cfg.method.name] = time_row(cfg)
        t = timings[cfg.method.name]
        seconds = pending[row.label] * (steps_per_run * t.step_s + images_per_run(cfg) * t.image_s)
        if row.label in plan.wise:
            seconds += len(plan.seeds) * (len(plan.alphas) - 1) * wise_images * t.image_s
        out[row.label] = seconds
    return out


def _row_cfg(plan: Plan, row: Row) -> Config:
    return plan.config(row, row.grid[len(row.grid) // 2], plan.seeds[0])
