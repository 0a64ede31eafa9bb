"""The model a run started from (pretrained backbone + initial head): WiSE-FT's zero-shot end."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from gmixout_cli.config import build_saved_config
from gmixout_cli.errors import UserError
from gmixout_cli.merge.wise import State
from gmixout_cli.models import build_model


def initial_state(run_dir: Path, meta: dict[str, str]) -> State:
    """Rebuild the run's starting weights from its config and its saved initial head."""
    head_path = run_dir / "init_head.safetensors"
    if "config" not in meta or not head_path.is_file():
        raise UserError(f"{run_dir} lacks its config or init_head.safetensors: "
                        "pass --base PATH to the model to merge with")
    cfg = build_saved_config(json.loads(meta["config"]))
    class_names = json.loads(meta["class_names"])
    built = build_model(cfg.model, class_names, cfg.train.seed)
    head = load_file(str(head_path))
    with torch.no_grad():
        for name, value in head.items():
            built.head.state_dict()[name].copy_(value)
    return {k: v.detach().cpu() for k, v in built.model.state_dict().items()}
