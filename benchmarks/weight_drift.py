"""How far each method moved the backbone from its pretrained weights, beside what it scored out of domain.

    python -m benchmarks.weight_drift runs/pacs/efficientnet_lite0-sketch --out benchmarks/results/drift_sketch

For every selected run of a `gmixout compare` folder whose model.safetensors is there (published runs keep
only small files), the relative change of the method's target weights (every conv and linear weight of a
convnet's backbone, the head left out): ||W - W0|| / ||W0|| over all of them and per stage, with W0 the
pretrained weights that the product's own model builder loads. A regulariser that keeps W near W0
(Mixout's pull towards the pretrained weights, GMixout's anchor) should show a smaller drift than full
fine-tuning at the same learning rate; whether the OOD mean follows the drift is what the table shows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import statistics
import sys
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from benchmarks.bench_common import git_head
from gmixout_cli.compare.report import at_selected
from gmixout_cli.config.load import build_saved_config
from gmixout_cli.models.export import read_metadata
from gmixout_cli.models.registry import build_model, resolve_targets
from gmixout_cli.utils.io import write_json, write_text


def stage(name: str) -> str:
    """The stage a parameter belongs to: 'blocks.3' for timm's blocks.3.*, else its first component."""
    m = re.match(r"(blocks\.\d+)\.", name)
    return m.group(1) if m else name.split(".")[0]


def drift(state: dict[str, torch.Tensor], pretrained: dict[str, torch.Tensor], targets: list[str]) -> dict[str, Any]:
    """Relative Frobenius change of the targets, over all of them and per stage."""
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for name in targets:
        w0 = pretrained[name].float()
        d = (state[name].float() - w0).pow(2).sum().item()
        s = stage(name)
        num[s], den[s] = num.get(s, 0.0) + d, den.get(s, 0.0) + w0.pow(2).sum().item()
    return {"total": math.sqrt(sum(num.values()) / sum(den.values())),
            "stages": {s: math.sqrt(num[s] / den[s]) for s in num}}


def pretrained_of(model_file: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The pretrained weights and target names of the model an exported file was fine-tuned from."""
    meta = read_metadata(model_file)
    cfg = build_saved_config(json.loads(meta["config"]))
    model_cfg = dataclasses.replace(cfg.model, head_init="zero")  # the head is not compared: no probe needed
    built = build_model(model_cfg, json.loads(meta["class_names"]), seed=0)
    targets = resolve_targets(built, cfg.model.targets)
    state = built.model.state_dict()
    return {name: state[name].detach().clone() for name in targets}, targets


def measure(folder: Path) -> list[dict[str, Any]]:
    report = json.loads((folder / "compare.json").read_text())
    rows = []
    reference: tuple[dict[str, torch.Tensor], list[str]] | None = None
    for run in at_selected(report, report["runs"]):
        model_file = folder / run["dir"] / "model.safetensors"
        if not model_file.is_file():
            continue
        if reference is None:
            reference = pretrained_of(model_file)
        pretrained, targets = reference
        rows.append({"label": run["label"], "value": run["value"], "seed": run["seed"],
                     "id": next(iter(run["id"].values())), "ood_avg": run["ood_avg"],
                     "drift": drift(load_file(model_file), pretrained, targets)})
    return rows


def markdown(rows: list[dict[str, Any]], title: str) -> str:
    labels = list(dict.fromkeys(r["label"] for r in rows))
    stages = list(rows[0]["drift"]["stages"]) if rows else []
    lines = [f"### {title}", "", "| method | lr | seeds | held-out ID | OOD mean | drift (all targets) | "
             + " | ".join(stages) + " |", "|---" * (6 + len(stages)) + "|"]
    mean = statistics.fmean
    for label in labels:
        rs = [r for r in rows if r["label"] == label]
        lines.append(f"| {label} | {rs[0]['value']:g} | {len(rs)} | {100 * mean(r['id'] for r in rs):.1f} | "
                     f"{100 * mean(r['ood_avg'] for r in rs):.1f} | {mean(r['drift']['total'] for r in rs):.4f} | "
                     + " | ".join(f"{mean(r['drift']['stages'][s] for r in rs):.4f}" for s in stages) + " |")
    lines += ["", "Drift: ||W - W0|| / ||W0|| of the target weights (head excluded), mean over the seeds whose "
              "weights were on disk."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.weight_drift", description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, help="a gmixout compare output folder (compare.json, runs/)")
    ap.add_argument("--out", type=Path, required=True, help="output stem: writes STEM.json and STEM.md")
    argv = sys.argv[1:] if argv is None else argv
    args = ap.parse_args(argv)
    rows = measure(args.folder)
    if not rows:
        raise SystemExit(f"weight_drift: no selected run with model.safetensors under {args.folder}")
    write_json(args.out.with_suffix(".json"), {"benchmark": "weight_drift", "folder": str(args.folder),
                                               "git_commit": git_head(), "command": " ".join(
                                                   ["python", "-m", "benchmarks.weight_drift", *argv]),
                                               "runs": rows})
    text = markdown(rows, f"Weight drift from the pretrained backbone: {args.folder.name}")
    write_text(args.out.with_suffix(".md"), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
