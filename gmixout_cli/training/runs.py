"""Run folders: creating them, finding the latest one, reading a run's config back."""

from __future__ import annotations

import time
import warnings
from pathlib import Path

from typing import Any

from gmixout_cli.config import Config, build_config, config_to_dict, flatten_dict, load_config, read_yaml
from gmixout_cli.errors import UserError
from gmixout_cli.training.checkpoint import CHECKPOINT, config_hash, read_checkpoint_meta

RUNS_ROOT = Path("runs")


def new_run_dir(out: str | None, cfg: Config) -> Path:
    """`--out DIR` (must be new or empty) or runs/<time>-<model>-<method>; never overwrites a run."""
    if out:
        path = Path(out).expanduser()
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise UserError(f"run folder {path} already exists and is not empty: choose another --out or remove it")
    else:
        model = cfg.model.name.replace(":", "-").replace("/", "-")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        path = RUNS_ROOT / f"{stamp}-{model}-{cfg.method.name}"
        n = 1
        while path.exists():
            n += 1
            path = RUNS_ROOT / f"{stamp}-{model}-{cfg.method.name}-{n}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def latest_run() -> Path:
    """The most recently finished run under runs/."""
    runs = sorted(RUNS_ROOT.glob("*/model.safetensors"), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise UserError(f"no finished run under {RUNS_ROOT.resolve()}: give a run folder or a .safetensors file")
    return runs[-1].parent


def read_run_config(run_dir: Path) -> Config:
    """The resolved config a run saved."""
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise UserError(f"{run_dir} has no config.yaml, so it is not a gmixout run folder: give a run folder")
    return build_config(read_yaml(path))


def resume_run(target: str, recipe: str | None, overrides: list[str], shortcuts: dict[str, Any]) -> tuple[Path, Config]:
    """The run folder to continue and its config; a config given now that differs is reported (the run's wins)."""
    if target == "auto":
        candidates = sorted((p.parent for p in RUNS_ROOT.glob(f"*/{CHECKPOINT}")
                             if not (p.parent / "model.safetensors").exists()), key=lambda d: d.stat().st_mtime)
        if not candidates:
            raise UserError(f"no unfinished run with a checkpoint under {RUNS_ROOT.resolve()}: give --resume RUN_DIR")
        run_dir = candidates[-1]
    else:
        run_dir = Path(target).expanduser()
        run_dir = run_dir.parent if run_dir.is_file() else run_dir
    if (run_dir / "model.safetensors").exists():
        raise UserError(f"{run_dir} already finished (model.safetensors exists): nothing to resume")
    if not (run_dir / CHECKPOINT).is_file():
        raise UserError(f"{run_dir} has no {CHECKPOINT}: it never checkpointed (set train.checkpoint_every) "
                        "or is not a run folder")
    cfg = read_run_config(run_dir)
    if read_checkpoint_meta(run_dir / CHECKPOINT)["config_hash"] != config_hash(cfg):
        raise UserError(f"{run_dir}/config.yaml was edited after the checkpoint was written: restore it to resume")
    if recipe or overrides or any(v is not None for v in shortcuts.values()):
        given = flatten_dict(config_to_dict(load_config(recipe or str(run_dir / "config.yaml"), overrides, shortcuts)))
        saved = flatten_dict(config_to_dict(cfg))
        changed = [f"{k}: {saved[k]!r} (run) vs {given[k]!r} (given)" for k in saved if given.get(k) != saved[k]]
        if changed:
            warnings.warn("resuming with the run's own config; these values given now are not used: "
                          + "; ".join(changed), stacklevel=2)
    return run_dir, cfg
