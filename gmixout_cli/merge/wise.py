"""WiSE-FT: interpolate every floating tensor between the zero-shot / initial model and the fine-tuned one."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gmixout_cli.errors import UserError
from gmixout_cli.utils.io import save_safetensors

State = dict[str, torch.Tensor]


def load_weights(path: Path) -> tuple[State, dict[str, str]]:
    """A gmixout safetensors file: its tensors and metadata."""
    if not path.is_file():
        raise UserError(f"weight file {path} does not exist: give a run folder or a .safetensors file")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except Exception as exc:  # safetensors raises several types for damaged files
        kind = type(exc).__name__
        raise UserError(f"cannot read {path} as safetensors ({kind}): re-export or re-download it") from None
    if not meta.get("format", "").startswith("gmixout/"):
        raise UserError(f"{path} is not a gmixout model file (no gmixout metadata): give a file written by gmixout")
    return state, meta


def check_compatible(
    a: State, a_meta: dict[str, str], b: State, b_meta: dict[str, str], a_name: str, b_name: str
) -> None:
    """Same library, architecture, classes, tensor names and shapes; else a user error naming the difference."""
    for key in ("library", "arch", "class_names"):
        if a_meta.get(key) != b_meta.get(key):
            raise UserError(f"cannot merge {a_name} and {b_name}: different {key} "
                            f"({a_meta.get(key)} vs {b_meta.get(key)}); merge runs of the same model and classes")
    if a.keys() != b.keys():
        diff = sorted(a.keys() ^ b.keys())
        raise UserError(f"cannot merge {a_name} and {b_name}: {len(diff)} tensor names differ (e.g. {diff[0]})")
    for name, tensor in a.items():
        if tensor.shape != b[name].shape:
            raise UserError(f"cannot merge {a_name} and {b_name}: {name} has shape {tuple(tensor.shape)} "
                            f"vs {tuple(b[name].shape)}")


def interpolate(base: State, tuned: State, alpha: float) -> State:
    """(1-alpha)*base + alpha*tuned for floating tensors; integer buffers keep the fine-tuned value."""
    out = {}
    for name, t in tuned.items():
        b = base[name]
        out[name] = torch.lerp(b.float(), t.float(), alpha).to(t.dtype) if t.is_floating_point() else t.clone()
    return out


def save_merged(path: Path, state: State, meta: dict[str, str], merge_info: dict) -> None:
    """Write a merged model atomically, keeping the metadata needed to rebuild it."""
    save_safetensors(path, {k: v.contiguous() for k, v in state.items()}, dict(meta, merge=json.dumps(merge_info)))
