"""Run folders: creating them, finding the latest one, reading a run's config back."""

from __future__ import annotations

import time
from pathlib import Path

from gmixout_cli.config import Config, build_config, read_yaml
from gmixout_cli.errors import UserError

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
