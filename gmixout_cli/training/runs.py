"""Run folders: claiming one (one process at a time), resuming, finding the latest, reading a config back.

A run folder's state, from its files:
- fresh: absent or empty;
- started: config.yaml and logs, no checkpoint (stopped before its first checkpoint: nothing to resume);
- resumable: checkpoint.safetensors and no results.json;
- finished: results.json (and model.safetensors).
"""

from __future__ import annotations

import contextlib
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gmixout_cli.config import Config, build_saved_config, config_to_dict, flatten_dict, load_config, read_yaml
from gmixout_cli.errors import UserError
from gmixout_cli.training.checkpoint import CHECKPOINT, RESUME_SETTABLE, matching_config_hashes, read_checkpoint_meta
from gmixout_cli.utils.io import remove_stale_temporaries, write_yaml
from gmixout_cli.utils.locks import LockHeld, exclusive_lock

RUNS_ROOT = Path("runs")
LOCK = ".gmixout.lock"
# what a run writes before training, and before its first checkpoint; the same command writes them again
SET_UP_FILES = ("config.yaml", "init_head.safetensors")
STARTED_FILES = (*SET_UP_FILES, "metrics.jsonl")


@dataclass
class RunFolder:
    path: Path
    cfg: Config
    resume: bool


@contextlib.contextmanager
def open_run(resume: str | None, out: str | None, recipe: str | None, overrides: list[str],
             shortcuts: dict[str, Any]) -> Iterator[RunFolder]:
    """The run folder to train in, held by this process until the block ends.

    `resume=None`: a new run (`out`, which must be new or empty, or a fresh folder under runs/).
    `resume="auto"` with `out`: continue `out` if it holds a checkpoint, start fresh there if it holds no run
    yet, refuse a finished run. `resume="auto"` alone: the latest unfinished run under runs/. Else: that folder.
    """
    new_cfg = load_config(recipe, overrides, shortcuts) if resume is None else None  # errors before any folder
    if resume is None or (resume == "auto" and out):
        path = Path(out).expanduser() if out else _new_run_path(new_cfg or load_config(recipe, overrides, shortcuts))
    else:
        path = _latest_unfinished() if resume == "auto" else _as_run_dir(Path(resume).expanduser())
    created, fresh = not path.exists(), not _entries(path)
    try:
        with claim(path):
            remove_stale_temporaries(path)  # left by a process killed mid-write; never a complete file
            if resume is not None:
                if (path / "results.json").exists():
                    raise UserError(f"{path} already finished (results.json exists): nothing to resume; "
                                    "choose another --out")
                if (path / CHECKPOINT).is_file():
                    yield RunFolder(path, resumable_config(path, recipe, overrides, shortcuts), True)
                    return
                _refuse_unresumable(path, started_ok=resume == "auto")
            cfg = new_cfg or load_config(recipe, overrides, shortcuts)
            if not cfg.data.root:
                raise UserError("no training data: pass --data ROOT/DOMAIN (or data.root=...), "
                                "or use --recipe quickstart")
            _check_fresh(path, started_ok=resume == "auto")
            write_yaml(path / "config.yaml", config_to_dict(cfg))
            yield RunFolder(path, cfg, False)
    except BaseException:
        if fresh and path.is_dir() and set(_entries(path)) <= set(SET_UP_FILES):
            # stopped before training: what set-up wrote is rewritten by the same command, so it goes
            for name in SET_UP_FILES:
                (path / name).unlink(missing_ok=True)
            if created:
                shutil.rmtree(path, ignore_errors=True)
        raise


@contextlib.contextmanager
def claim(path: Path) -> Iterator[None]:
    """Create `path` if needed and hold its lock file: a second process on the same folder is refused."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{path} exists and is not a folder: choose another --out") from None
    try:
        with exclusive_lock(path / LOCK):
            yield
    except LockHeld as held:
        raise UserError(f"run folder {path} is in use by another gmixout process (pid {held.owner}): wait for it "
                        "to finish, or choose another --out") from None


def resumable_config(run_dir: Path, recipe: str | None, overrides: list[str], shortcuts: dict[str, Any]) -> Config:
    """The run's own config; of the values given now, the RESUME_SETTABLE ones are used (and saved in
    config.yaml), the others are reported, not used."""
    cfg = read_run_config(run_dir)
    if read_checkpoint_meta(run_dir / CHECKPOINT)["config_hash"] not in matching_config_hashes(cfg):
        raise UserError(f"{run_dir / CHECKPOINT} was written with another config than {run_dir / 'config.yaml'} "
                        "(the config was edited, or the checkpoint comes from another run): restore the matching "
                        "config.yaml to resume")
    if not (recipe or overrides or any(v is not None for v in shortcuts.values())):
        return cfg
    given = flatten_dict(config_to_dict(load_config(recipe or str(run_dir / "config.yaml"), overrides, shortcuts)))
    saved = flatten_dict(config_to_dict(cfg))
    changed = [k for k in saved if given.get(k) != saved[k]]
    ignored = [f"{k}: {saved[k]!r} (run) vs {given[k]!r} (given)" for k in changed if k not in RESUME_SETTABLE]
    if ignored:
        warnings.warn("resuming with the run's own config; these values given now are not used: "
                      + "; ".join(ignored) + f" (a resume may change only {', '.join(RESUME_SETTABLE)})", stacklevel=2)
    settable = [k for k in changed if k in RESUME_SETTABLE]
    if settable:
        raw = config_to_dict(cfg)
        for key in settable:
            section, name = key.split(".")
            raw[section][name] = given[key]
        cfg = build_saved_config(raw)
        write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    return cfg


def _new_run_path(cfg: Config) -> Path:
    model = cfg.model.name.replace(":", "-").replace("/", "-")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = RUNS_ROOT / f"{stamp}-{model}-{cfg.method.name}", 1
    while path.exists():
        n += 1
        path = RUNS_ROOT / f"{stamp}-{model}-{cfg.method.name}-{n}"
    return path


def _entries(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.name != LOCK) if path.is_dir() else []


def _check_fresh(path: Path, started_ok: bool) -> None:
    """A new run needs an empty folder (or, for `--resume auto`, one whose run never checkpointed)."""
    entries = _entries(path)
    if started_ok and entries and set(entries) <= set(STARTED_FILES):
        for name in ("config.yaml", "init_head.safetensors"):  # written again; metrics.jsonl is appended to
            (path / name).unlink(missing_ok=True)
        warnings.warn(f"{path} holds a run stopped before its first checkpoint: starting it again", stacklevel=2)
    elif entries:
        raise UserError(f"run folder {path} already exists and is not empty: choose another --out or remove it")


def _refuse_unresumable(path: Path, started_ok: bool) -> None:
    """A clear line for every unfinished folder without a checkpoint (`started_ok`: such a run may restart)."""
    if (path / "model.safetensors").exists():
        raise UserError(f"{path} already finished training (model.safetensors exists): score it with "
                        f"`gmixout evaluate {path}`")
    if not started_ok:
        raise UserError(f"{path} has no {CHECKPOINT}: it never checkpointed (set train.checkpoint_every) "
                        "or is not a run folder")


def _latest_unfinished() -> Path:
    candidates = sorted((p.parent for p in RUNS_ROOT.glob(f"*/{CHECKPOINT}")
                         if not (p.parent / "results.json").exists()), key=lambda d: d.stat().st_mtime)
    if not candidates:
        raise UserError(f"no unfinished run with a checkpoint under {RUNS_ROOT.resolve()}: give --resume RUN_DIR "
                        "or --resume auto --out DIR")
    return candidates[-1]


def _as_run_dir(path: Path) -> Path:
    if path.is_file():
        return path.parent
    if not path.is_dir():
        raise UserError(f"{path} does not exist: give the run folder to resume (or --resume auto)")
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
    return build_saved_config(read_yaml(path))
