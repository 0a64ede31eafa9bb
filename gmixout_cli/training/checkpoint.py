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
from gmixout_cli.training.distributed import Dist
from gmixout_cli.utils.io import save_safetensors

CHECKPOINT = "checkpoint.safetensors"


# how a run is carried out, not what it computes (per-sample seeds make the loader's workers irrelevant to the
# batches): a resumed run may change these, e.g. fewer workers after running out of memory
RESUME_SETTABLE = ("data.num_workers", "train.eval_batch_size", "train.log_every", "train.tensorboard",
                   "train.checkpoint_every")


def config_hash(cfg: Config) -> str:
    """A short hash of the resolved config, but for the RESUME_SETTABLE keys."""
    raw = config_to_dict(cfg)
    for key in RESUME_SETTABLE:
        section, name = key.split(".")
        raw[section].pop(name, None)
    return _digest(raw)


def matching_config_hashes(cfg: Config) -> set[str]:
    """The hashes a checkpoint of this config may carry: today's, and that of versions that hashed every key."""
    return {config_hash(cfg), _digest(config_to_dict(cfg))}


def _digest(raw: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(raw, sort_keys=True).encode()).hexdigest()[:16]


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
        "world_size": trainer.dist.world,
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


META_KEYS = ("progress", "method", "optimizer_steps", "step", "schedule", "config_hash")


def read_checkpoint_meta(path: Path) -> dict[str, Any]:
    """The JSON metadata of a checkpoint; a clear error for other files (foreign, damaged, hostile)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("gmixout_checkpoint")
    except Exception:  # noqa: BLE001 - safetensors raises several types on damaged files
        raw = None
    if raw is None and _has_checkpoint_header(path):
        raise UserError(f"{path} is truncated or damaged (its data does not match its header): it cannot be "
                        "resumed; delete it to start the run again")
    if raw is None:
        raise UserError(f"{path} is not a readable gmixout checkpoint: resume from a run folder that has one")
    try:
        meta = json.loads(raw)
    except (ValueError, RecursionError):
        meta = None
    if not isinstance(meta, dict) or any(k not in meta for k in META_KEYS):
        raise UserError(f"{path} has damaged or foreign checkpoint metadata: it cannot be resumed; delete it to "
                        "start the run again")
    return meta


def _has_checkpoint_header(path: Path) -> bool:
    """Whether the file starts like one of our checkpoints (so a failed read means damage, not a foreign file)."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            return 0 < size <= 100_000_000 and b'"gmixout_checkpoint"' in f.read(size)
    except OSError:
        return False


def load_checkpoint(path: Path, trainer: Any) -> dict[str, Any]:
    """Restore a checkpoint into a freshly built trainer; returns its metadata.

    Every tensor is checked against the trainer before use: a truncated, foreign or edited file is a one-line
    error, never a crash mid-step or an out-of-range index handed to a kernel.
    """
    meta = read_checkpoint_meta(path)
    world = int(meta.get("world_size", 1))
    if world != trainer.dist.world:  # each rank's RNG stream and shard follow the world size it started with
        launch = Dist(0, world).launch
        raise UserError(f"{path} was written by a run of {world} process(es), this one has {trainer.dist.world}: "
                        f"resume with the same number, `{launch} --resume {path.parent}`")
    try:
        tensors = load_file(str(path))
    except Exception:  # noqa: BLE001 - a truncated or overwritten data section
        raise UserError(f"{path} is truncated or damaged (its data does not match its header): it cannot be "
                        "resumed; delete it to start the run again") from None
    try:
        _restore(tensors, meta, trainer)
    except (KeyError, ValueError, TypeError, RuntimeError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise UserError(f"checkpoint {path} does not match this run ({reason}): resume with the run's own config "
                        "and files, or delete it to start again") from None
    return meta


def _restore(tensors: dict[str, torch.Tensor], meta: dict[str, Any], trainer: Any) -> None:
    model_state = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    missing, unexpected = trainer.model.load_state_dict(model_state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{len(missing)} missing, {len(unexpected)} unexpected model tensors")
    trainer.method.load_state_dict({k[len("method/"):]: v for k, v in tensors.items() if k.startswith("method/")},
                                   meta["method"])
    for i, opt in enumerate(trainer.optimizers):
        opt.state.clear()
        for gi, group in enumerate(opt.param_groups):
            for pi, param in enumerate(group["params"]):
                key = f"opt{i}/{gi}/{pi}"
                if key not in meta["optimizer_steps"]:
                    continue
                moments = {m: tensors[f"{key}/{m}"] for m in ("exp_avg", "exp_avg_sq")}
                if any(v.shape != param.shape or v.dtype != param.dtype for v in moments.values()):
                    raise ValueError(f"optimizer moments {key} have another shape than their parameter")
                step = meta["optimizer_steps"][key]
                opt.state[param] = {  # torch's AdamW state format, which the sparse optimizer keeps too
                    "step": torch.tensor(float(step)), **{m: v.to(param.device) for m, v in moments.items()},
                }
    if len(meta["schedule"]) != len(trainer.schedulers):
        raise ValueError("another number of learning-rate schedules")
    for sched, last in zip(trainer.schedulers, meta["schedule"], strict=True):
        sched.last_epoch = int(last)
        lrs = [base * fn(sched.last_epoch) for base, fn in zip(sched.base_lrs, sched.lr_lambdas, strict=True)]
        for group, lr in zip(sched.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs
    trainer.step = int(meta["step"])
    torch.set_rng_state(tensors["rng/cpu"])
    if "rng/cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng/cuda"])
