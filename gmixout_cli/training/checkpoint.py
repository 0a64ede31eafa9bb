"""Checkpoints: everything needed to continue a run exactly, in one safetensors file (no pickle).

Tensors: the model's weights, the method's own state (GMixout: indices and delta values of the
episode), every optimizer moment, the RNG states. Metadata (JSON): step, epoch, position in the
epoch, episode, optimizer step counts, schedule position and the config hash.
"""

from __future__ import annotations

import errno
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gmixout_cli.config import Config, config_to_dict
from gmixout_cli.errors import UserError
from gmixout_cli.utils.io import save_safetensors

CHECKPOINT = "checkpoint.safetensors"


def config_hash(cfg: Config) -> str:
    """A short hash of the resolved config."""
    return hashlib.sha256(json.dumps(config_to_dict(cfg), sort_keys=True).encode()).hexdigest()[:16]


def save_checkpoint(run_dir: Path, trainer: Any, progress: dict[str, Any], cfg: Config) -> Path:
    """Write run_dir/checkpoint.safetensors atomically; the previous one stays intact if writing fails."""
    tensors: dict[str, torch.Tensor] = {f"model/{k}": v for k, v in trainer.model.state_dict().items()}
    method_tensors, method_values = trainer.method.state_dict()
    tensors.update({f"method/{k}": v for k, v in method_tensors.items()})
    steps: dict[str, float] = {}
    for i, opt in enumerate(trainer.optimizers):
        for gi, group in enumerate(opt.param_groups):
            for pi, param in enumerate(group["params"]):
                state = opt.state.get(param)
                if not state:
                    continue
                key = f"opt{i}/{gi}/{pi}"
                steps[key] = float(state["step"])
                tensors[f"{key}/exp_avg"] = state["exp_avg"]
                tensors[f"{key}/exp_avg_sq"] = state["exp_avg_sq"]
    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng/cuda"] = torch.cuda.get_rng_state()
    meta = {
        "progress": progress, "method": method_values, "optimizer_steps": steps, "step": trainer.step,
        "schedule": [s.last_epoch for s in trainer.schedulers], "config_hash": config_hash(cfg),
    }
    path = run_dir / CHECKPOINT
    try:
        save_safetensors(path, {k: v.detach().contiguous().cpu() for k, v in tensors.items()},
                         {"gmixout_checkpoint": json.dumps(meta)})
    except OSError as exc:
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise UserError(f"could not write a checkpoint to {path}: {reason}; the previous checkpoint is intact, "
                        "free space and resume with `gmixout finetune --resume " + str(run_dir) + "`") from None
    return path


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint; a clear error for other files."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("gmixout_checkpoint")
    except Exception:  # noqa: BLE001 - safetensors raises several types on damaged files
        raw = None
    if raw is None:
        raise UserError(f"{path} is not a readable gmixout checkpoint: resume from a run folder that has one")
    return json.loads(raw)


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """Restore a checkpoint into a freshly built trainer; returns its metadata."""
    meta = read_checkpoint_meta(path)
    tensors = load_file(str(path))
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = trainer.model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not match this model ({len(missing)} missing, {len(unexpected)} "
                        "unexpected tensors): resume with the run's own config")
    trainer.method.load_state_dict({k[len("method/"):]: v for k, v in tensors.items() if k.startswith("method/")},
                                   meta["method"])
    for i, opt in enumerate(trainer.optimizers):
        opt.state.clear()
        for gi, group in enumerate(opt.param_groups):
            for pi, param in enumerate(group["params"]):
                key = f"opt{i}/{gi}/{pi}"
                if key not in meta["optimizer_steps"]:
                    continue
                step = meta["optimizer_steps"][key]
                opt.state[param] = {
                    # torch's AdamW keeps the step as a tensor, the sparse one as an int
                    "step": torch.tensor(step) if isinstance(opt, torch.optim.AdamW) else int(step),
                    "exp_avg": tensors[f"{key}/exp_avg"].to(param.device),
                    "exp_avg_sq": tensors[f"{key}/exp_avg_sq"].to(param.device),
                }
    for sched, last in zip(trainer.schedulers, meta["schedule"]):
        sched.last_epoch = last
        lrs = [base * fn(last) for base, fn in zip(sched.base_lrs, sched.lr_lambdas)]
        for group, lr in zip(sched.optimizer.param_groups, lrs):
            group["lr"] = lr
        sched._last_lr = lrs
    trainer.step = meta["step"]
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
    return meta
