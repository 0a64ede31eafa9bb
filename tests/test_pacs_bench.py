"""benchmarks.pacs end to end on a tiny PACS-shaped tree, and its summary arithmetic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from benchmarks import pacs
from benchmarks import pacs_report as report
from conftest import COLORS, write_domains

pytestmark = pytest.mark.bench


def _pacs_like(root: Path) -> Path:
    """Three domains with PACS-format split lists (train / crossval, test = both)."""
    write_domains(root, ("photo", "sketch", "cartoon"), per_class=6, size=32)
    (root / "splits").mkdir()
    for domain in ("photo", "sketch", "cartoon"):
        lines = {"train": [], "crossval": []}
        for label, name in enumerate(sorted(COLORS), start=1):
            for i in range(6):
                lines["train" if i < 4 else "crossval"].append(f"{domain}/{name}/{i:03d}.png {label}")
        lines["test"] = lines["train"] + lines["crossval"]
        for split, rows in lines.items():
            (root / "splits" / f"{domain}_{split}_kfold.txt").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.slow
def test_pacs_benchmark_end_to_end(tmp_path: Path) -> None:
    data = _pacs_like(tmp_path / "pacs")
    argv = ["--methods", "lp,lpft,gmixout", "--seeds", "0,1", "--grid", "lpft=1e-4,1e-3", "--epochs", "1",
            "--image-size", "32", "--batch-size", "6", "--workers", "0", "--data", str(data),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert pacs.main(argv) == 0
    out = json.loads((tmp_path / "out" / "pacs_efficientnet_lite0_photo.json").read_text())
    assert out["ood_domains"] == ["cartoon", "sketch"]
    assert out["sizes"] == {"crossval": 6, "test": 18, "cartoon": 18, "sketch": 18}
    sel = out["selection"]["lpft"]
    assert set(sel["crossval"]) == {"0.0001", "0.001"} and sel["selected"] in (1e-4, 1e-3)
    best = max(sel["crossval"].values())
    assert sel["crossval"][f"{sel['selected']:g}"] == best  # chosen on crossval
    assert sorted((r["method"], r["seed"]) for r in out["runs"]) == sorted(
        (m, s) for m in ("lp", "lpft", "gmixout") for s in (0, 1))
    for r in out["runs"]:
        assert 0.0 <= r["ood_mean"] <= 1.0 and set(r["ood"]) == {"cartoon", "sketch"}
        assert r["ood_mean"] == pytest.approx(sum(r["ood"].values()) / 2)
    assert [p["alpha"] for p in out["wise_ft_lpft"][0]["curve"]] == pacs.ALPHAS
    lpft_seed0 = next(r for r in out["runs"] if r["method"] == "lpft" and r["seed"] == 0)
    assert out["wise_ft_lpft"][0]["curve"][-1]["test"] == lpft_seed0["test"]  # alpha = 1 is the run itself
    assert set(out["summary"]) == {"lp", "lpft", "gmixout", "wise-ft (lpft)"}
    assert out["summary"]["gmixout"]["ood_mean"]["n"] == 2
    md = (tmp_path / "out" / "pacs_efficientnet_lite0_photo.md").read_text()
    assert "| gmixout |" in md and "| wise-ft (lpft) | α on crossval |" in md
    assert (tmp_path / "out" / "pacs_efficientnet_lite0_photo.png").stat().st_size > 1000

    # a second invocation reuses every finished run instead of training again
    models = sorted((tmp_path / "work").glob("*/model.safetensors"))
    stamps = [p.stat().st_mtime_ns for p in models]
    assert pacs.main(argv) == 0
    assert [p.stat().st_mtime_ns for p in models] == stamps
    assert out["device"] == pacs.device_name(torch.device("cpu"))  # where the runs trained
    assert all((p.parent / "device.txt").is_file() for p in models)

    # only the small files came back from another machine (gpu_job.sh): scored runs are reused, a run
    # that was trained but not yet scored is trained again
    for model in models:
        model.unlink()
    lp1 = next((tmp_path / "work").glob("*-lp-*-s1"))
    (lp1 / "pacs_scores.json").unlink()
    assert pacs.main(argv) == 0
    assert (lp1 / "model.safetensors").is_file() and (lp1 / "pacs_scores.json").is_file()
    assert sum(1 for _ in (tmp_path / "work").glob("*/model.safetensors")) == 1

    # --report-only trains nothing and reports what is finished: here gmixout lost its seed-1 run
    next((tmp_path / "work").glob("*-gmixout-*-s1")).joinpath("results.json").unlink()
    assert pacs.main([*argv, "--report-only"]) == 0
    partial = json.loads((tmp_path / "out" / "pacs_efficientnet_lite0_photo.json").read_text())
    assert partial["summary"]["gmixout"]["test"]["n"] == 1 and partial["summary"]["lp"]["test"]["n"] == 2
    assert "| gmixout |" in (tmp_path / "out" / "pacs_efficientnet_lite0_photo.md").read_text()

    # --keep-others: only lp is reported anew, every other method's rows come from the report on disk
    keep = [a if a != "lp,lpft,gmixout" else "lp" for a in argv]
    assert pacs.main([*keep, "--report-only", "--keep-others"]) == 0
    kept = json.loads((tmp_path / "out" / "pacs_efficientnet_lite0_photo.json").read_text())
    assert set(kept["summary"]) == set(partial["summary"]) and kept["replaced"][0]["method"] == "lp"
    assert kept["summary"]["gmixout"] == partial["summary"]["gmixout"] and kept["wise_ft_lpft"]
    with pytest.raises(SystemExit, match="epochs"):
        pacs.main([*keep, "--report-only", "--keep-others", "--epochs", "2"])


def test_summary_mean_std_and_wise_selection() -> None:
    def run(method: str, seed: int, test: float, ood: tuple[float, float]) -> dict:
        return {"method": method, "seed": seed, "test": test, "crossval": test,
                "ood": dict(zip("ab", ood, strict=True)), "ood_mean": sum(ood) / 2}

    curve = [{"alpha": a, "test": 0.9, "crossval": c, "ood": {"a": 0.5, "b": 0.5}, "ood_mean": 0.5 + a / 10}
             for a, c in ((0.0, 0.7), (0.5, 0.8), (1.0, 0.8))]
    rep = {"runs": [run("full", 0, 0.90, (0.4, 0.6)), run("full", 1, 0.80, (0.6, 0.8))],
           "wise_ft_lpft": [{"seed": 0, "curve": curve}]}
    s = report.summarise(rep)
    assert s["full"]["test"]["mean"] == pytest.approx(85.0)
    assert s["full"]["test"]["std"] == pytest.approx(7.0710678)  # sample std of 90, 80
    assert s["full"]["ood_mean"]["mean"] == pytest.approx(60.0)
    assert report.wise_selected(curve)["alpha"] == 1.0  # crossval tie: the larger alpha
    assert s["wise-ft (lpft)"]["ood_mean"]["mean"] == pytest.approx(60.0) and s["wise-ft (lpft)"]["test"]["n"] == 1


def _report(commit: str, runs: list[dict], settings: dict | None = None) -> dict:
    base = {"epochs": 2, "image_size": 128, "batch_size": 32, "seeds": [0, 1], "extra_overrides": [],
            "method_overrides": {r["method"]: [] for r in runs}}
    return {"backbone": "b", "source": "photo", "ood_domains": ["a", "b"], "git_commit": commit, "date": "2026-11-23",
            "command": "pacs.py", "device": "cpu", "settings": dict(base, **(settings or {})), "runs": runs,
            "selection": {r["method"]: {"key": "train.lr", "selected": 1e-4} for r in runs},
            "wise_ft_lpft": []}


def test_keep_others_replaces_one_method_and_keeps_its_old_rows() -> None:
    def run(method: str, seed: int, ood: float, device: str = "cpu") -> dict:
        return {"method": method, "seed": seed, "test": 0.9, "crossval": 0.9, "ood": {"a": ood, "b": ood},
                "ood_mean": ood, "device": device}

    old = _report("a" * 40, [run("full", 0, 0.4), run("full", 1, 0.5), run("gmixout", 0, 0.6), run("gmixout", 1, 0.7)])
    old["summary"] = report.summarise(old)
    new = _report("b" * 40, [run("gmixout", 0, 0.3, "gpu"), run("gmixout", 1, 0.2, "gpu")])
    merged = report.carry_over(new, old, ["gmixout"])
    assert sorted((r["method"], r["ood_mean"]) for r in merged["runs"]) == [
        ("full", 0.4), ("full", 0.5), ("gmixout", 0.2), ("gmixout", 0.3)]
    assert merged["row_commits"] == {"full": "a" * 40, "gmixout": "b" * 40} and merged["device"] == "cpu, gpu"
    assert merged["replaced"][0]["method"] == "gmixout"
    assert merged["replaced"][0]["summary"]["ood_mean"]["mean"] == pytest.approx(65.0)
    md = report.markdown(merged, report.summarise(merged))
    assert "| gmixout (replaced; commit aaaaaaa) |" in md and "65.0 ± 7.1" in md
    assert "aaaaaaa (full); bbbbbbb (gmixout)" in md
    with pytest.raises(ValueError, match="epochs"):  # a different budget cannot share a table
        report.carry_over(_report("c" * 40, new["runs"], {"epochs": 3}), old, ["gmixout"])


def test_cached_run_is_stale_when_its_recipe_changed(tmp_path: Path) -> None:
    from gmixout_cli.config import config_to_dict, load_config
    from gmixout_cli.utils.io import write_yaml

    now = config_to_dict(load_config("gmixout_efficientnet_lite0", ["data.root=/here/photo"]))
    saved = tmp_path / "config.yaml"
    old = config_to_dict(load_config("gmixout_efficientnet_lite0", [
        "data.root=/gpu/.pacs128/photo", "data.num_workers=8", "method.episodes=5", "train.lr=3e-05"]))
    del old["method"]["norm_stats"]  # a field the schema gained after the run: its default is the old behaviour
    write_yaml(saved, old)
    assert pacs.stale_keys(saved, now) == ["train.lr", "method.episodes"]  # machine keys do not count
    same_episodes = {**old["method"], "episodes": now["method"]["episodes"]}
    write_yaml(saved, {**old, "train": now["train"], "method": same_episodes})
    assert pacs.stale_keys(saved, now) == []
    # A LoRA run does not read GMixout's episodes: a new GMixout default in the shared recipe keeps it valid.
    lora_now = config_to_dict(load_config("gmixout_efficientnet_lite0", ["data.root=/here/photo", "method.name=lora"]))
    write_yaml(saved, {**lora_now, "method": {**lora_now["method"], "episodes": 5, "r": 4}})
    assert pacs.stale_keys(saved, lora_now) == ["method.r"]
    saved.write_text("{not: yaml: [")
    assert pacs.stale_keys(saved, now) == ["config.yaml"]
    assert pacs.stale_keys(tmp_path / "missing.yaml", now) == ["config.yaml"]


def test_pacs_sweep_scores_variants_on_crossval(tmp_path: Path) -> None:
    from benchmarks import pacs_sweep as sweep
    data = _pacs_like(tmp_path / "pacs")
    argv = ["--source", "photo", "--variants", "targets=pointwise", "--seeds", "0", "--epochs", "1",
            "--image-size", "32", "--batch-size", "6", "--workers", "0", "--data", str(data),
            "--work", str(tmp_path / "work"), "--out", str(tmp_path / "out")]
    assert sweep.main(argv) == 0
    out = json.loads((tmp_path / "out" / "pacs_sweep_efficientnet_lite0_photo.json").read_text())
    # The defaults run first even when not asked for: every variant is compared with them seed by seed.
    assert list(out["variants"]) == ["default", "targets=pointwise"] and out["selection_split"] == "crossval"
    runs = sorted(p.name for p in (tmp_path / "work").iterdir())
    assert len(runs) == 2 and sum("-x" in r for r in runs) == 1  # the variant's overrides key its own run
    cfg = (tmp_path / "work" / next(r for r in runs if "-x" in r) / "config.yaml").read_text()
    assert "'*conv_pw*.weight'" in cfg and "conv_head.weight" in cfg
    base, var = out["variants"]["default"], out["variants"]["targets=pointwise"]
    assert base["vs_default"] == {"mean": 0.0, "std": None}  # one seed: no spread to report
    assert var["vs_default"]["mean"] == pytest.approx(var["crossval"]["0"] - base["crossval"]["0"])
    for row in out["variants"].values():
        assert 0.0 <= row["mean"] <= 1.0 and set(row["crossval"]) == {"0"}
    md = (tmp_path / "out" / "pacs_sweep_efficientnet_lite0_photo.md").read_text()
    assert "| targets=pointwise |" in md and "vs default (paired)" in md


def test_pacs_sweep_pairs_seeds_with_the_defaults() -> None:
    from benchmarks import pacs_sweep as sweep
    d = sweep.paired({"0": 0.80, "1": 0.90, "2": 0.70}, {"0": 0.75, "1": 0.80, "2": 0.75})
    assert d["mean"] == pytest.approx(0.1 / 3) and d["std"] == pytest.approx(0.0763763, rel=1e-5)
    assert sweep.paired({"3": 0.5}, {"0": 0.4}) == {"mean": None, "std": None}


def test_pacs_sweep_pools_sources_with_the_same_settings(tmp_path: Path) -> None:
    from benchmarks import pacs_sweep as sweep
    settings = {"epochs": 2, "image_size": 128, "batch_size": 32, "lr": 1e-4, "seeds": [0, 1], "recipe": "r"}

    def write(source: str, default: list[float], variant: list[float], **changed: object) -> None:
        rows = {"default": {"crossval": dict(zip("01", default, strict=True))},
                "episodes=5": {"crossval": dict(zip("01", variant, strict=True))}}
        (tmp_path / f"pacs_sweep_efficientnet_lite0_{source}.json").write_text(json.dumps(
            {"benchmark": "pacs_sweep", "source": source, "settings": {**settings, **changed}, "variants": rows}))

    write("art_painting", [0.80, 0.82], [0.83, 0.84])
    write("cartoon", [0.70, 0.72], [0.73, 0.73])
    write("sketch", [0.50, 0.50], [0.10, 0.10], lr=3e-4)  # another lr: not pooled
    out = sweep.pool(tmp_path, "efficientnet_lite0", settings)
    assert out["sources"] == ["art_painting", "cartoon"]
    row = out["variants"]["episodes=5"]
    assert row["diffs"] == pytest.approx([0.03, 0.02, 0.03, 0.01]) and row["sources"] == ["art_painting", "cartoon"]
    assert row["mean"] == pytest.approx(0.0225) and row["passes"]  # 2.25 points > their spread (0.96)
    md = sweep.pooled_markdown("efficientnet_lite0", out)
    assert "| episodes=5 | art_painting, cartoon | 4 | +2.2 ± 1.0 | yes |" in md


def test_pacs_sweep_leaves_out_variants_that_restate_the_recipe(tmp_path: Path) -> None:
    from benchmarks import pacs_sweep as sweep
    # EfficientNet-Lite0's recipe starts from a zero head (chosen by the sweep), MobileNetV2's from a linear probe
    lite0, mnv2 = sweep.variants_for("efficientnet_lite0"), sweep.variants_for("mobilenet_v2")
    assert "head_init=linear_probe" in lite0 and "head_init=zero" not in lite0
    assert "head_init=zero" in mnv2 and "head_init=linear_probe" not in mnv2
    assert "default" in lite0 and "episodes=5" in lite0
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "head_init=zero", "--data", str(_pacs_like(tmp_path / "pacs"))])


def test_pacs_sweep_rejects_unknown_variant(tmp_path: Path) -> None:
    from benchmarks import pacs_sweep as sweep
    with pytest.raises(SystemExit):
        sweep.main(["--variants", "p=0.5", "--data", str(_pacs_like(tmp_path / "pacs"))])


def test_pacs_pack_keeps_every_image_and_the_split_lists(tmp_path: Path) -> None:
    from PIL import Image

    data = _pacs_like(tmp_path / "pacs")
    from benchmarks import pacs_pack as pack
    assert pack.main(["--data", str(data), "--out", str(tmp_path / "small"), "--size", "16"]) == 0
    small = tmp_path / "small"
    assert sorted(p.name for p in (small / "splits").iterdir()) == sorted(p.name for p in (data / "splits").iterdir())
    for line in (small / "splits" / "photo_test_kfold.txt").read_text().split("\n"):
        if line:
            with Image.open(small / line.rsplit(maxsplit=1)[0]) as img:
                assert min(img.size) == 16
    count = sum(1 for p in data.rglob("*.png"))
    assert sum(1 for p in small.rglob("*.png")) == count and not (tmp_path / "small.partial").exists()
