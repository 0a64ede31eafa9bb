"""Held-out scoring of merged weights: the validation split of the run's own training domain."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from gmixout_cli.config import build_saved_config
from gmixout_cli.data import build_transform, load_domain, make_loader
from gmixout_cli.errors import UserError
from gmixout_cli.eval import top1
from gmixout_cli.merge.wise import State
from gmixout_cli.models import load_classifier
from gmixout_cli.utils.memory import resolve_device


def val_scorer(template: Path, meta: dict[str, str], workers: int = 2) -> Callable[[State], float]:
    """A function giving the held-out (validation split) top-1 of a state dict of `template`'s architecture."""
    if "config" not in meta:
        raise UserError(f"{template} does not say which data it was trained on: merge files written by gmixout runs")
    cfg = build_saved_config(json.loads(meta["config"]))
    data = load_domain(cfg.data)
    model, _ = load_classifier(template)
    device = resolve_device("auto")
    model.to(device)
    transform = build_transform(int(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"]), False)

    def score(state: State) -> float:
        with torch.no_grad():
            model.load_state_dict(state)
        return top1(model, make_loader(data.val, transform, cfg.train.eval_batch_size, False, workers, 0), device)

    return score
