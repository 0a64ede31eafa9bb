"""benchmarks.step_bench on a small open_clip ViT on CPU: every method steps, nothing fails silently.

The GPU run records a failing config as {"error": ...} and goes on (one broken config must not cost the
grid), so this is where a broken method would otherwise first show up: on the lent machine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = [pytest.mark.bench, pytest.mark.slow]


def test_every_method_steps_and_gets_its_ratios(tmp_path: Path) -> None:
    pytest.importorskip("open_clip")
    pytest.importorskip("peft")
    from benchmarks import step_bench

    out = tmp_path / "steps.json"
    argv = ["--archs", "ViT-S-32", "--batches", "2", "--steps", "2", "--warmup", "1", "--checkpointing", "on",
            "--methods", "full,lora_r8,mixout,gmixout,gmixout_bf16w", "--k", "2", "--image-size", "64",
            "--device", "cpu", "--out", str(out)]
    assert step_bench.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["benchmark"] == "step_bench" and result["git_commit"]
    records = {r["method"]: r for r in result["records"]}
    assert set(records) == {"full", "lora_r8", "mixout", "gmixout", "gmixout_bf16w"}
    for name, rec in records.items():
        assert "error" not in rec and not rec.get("oom"), (name, rec.get("traceback"))
        assert rec["step_s_median"] > 0 and rec["images_per_s"] > 0 and rec["peak_memory_bytes"] > 0
        assert rec["vs_full"]["step_time"] > 0 and rec["vs_lora_r8"]["peak_memory"] > 0
    assert records["full"]["vs_full"]["step_time"] == pytest.approx(1.0)


def test_rss_phases_records_every_phase_of_every_step() -> None:
    from benchmarks import rss_phases

    peaks = rss_phases.measure("timm:test_vit", "gmixout", batch=2, steps=2, extra=["method.p=0.9", "method.k=10"])
    for step in (0, 1):
        assert all(f"step{step}.{p}" in peaks for p in ("forward", "backward", "optimizer", "between"))
    assert all(v > 100 * 2**20 for v in peaks.values())  # resident sets of a process that imported torch
    assert peaks["build"] >= peaks["start"]
