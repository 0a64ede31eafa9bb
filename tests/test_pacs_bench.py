"""benchmarks.pacs (a caller of `gmixout compare`) and benchmarks.pacs_pack on a tiny PACS-shaped tree."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import pytest

from benchmarks import pacs
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


def _args(tmp_path: Path, variants: list[str], grids: list[str], dry_run: bool) -> argparse.Namespace:
    """benchmarks.pacs's parsed arguments at the benchmark's budget."""
    return argparse.Namespace(work=tmp_path / "w", backbone="efficientnet_lite0", data=tmp_path / "pacs",
                              methods=pacs.METHODS, seeds="0,1,2", image_size=96, steps=600, workers=2,
                              variants=variants, grids=grids, dry_run=dry_run, levers=False, shared=[])


def test_each_source_is_one_compare_command_with_the_same_budget(tmp_path: Path) -> None:
    ns = _args(tmp_path, list(pacs.VARIANTS), list(pacs.GRIDS), dry_run=True)
    cmd = pacs.command(ns, "sketch")
    assert cmd[:3] == ["compare", "--data", str(tmp_path / "pacs" / "sketch")]
    assert "train.max_steps=600" in cmd and "data.image_size=96" in cmd and cmd[-1] == "--dry-run"
    assert cmd.count("--variant") == len(pacs.VARIANTS) == 8 and "--wise" in cmd
    # full fine-tuning from a zero head in both BatchNorm modes, never LP-FT's probe head under another name
    assert "full:method.name=full model.head_init=zero" in cmd and "full" not in cmd[cmd.index("--methods") + 1]
    assert "full_update_bn:method.name=full method.norm_stats=update model.head_init=zero" in cmd
    # mask levels and sparsities chosen on held-out data
    assert cmd[cmd.index("--family") + 1] == "gmixout=gmixout,gmixout_filter,gmixout_p0.95,gmixout_p0.98"
    assert "gmixout_episodes300=1e-4,3e-4,1e-3" in cmd  # a standalone row: its own grid, outside the family
    assert "gmixout_lp_head=1e-4,3e-4,1e-3" in cmd and "model.head_init=linear_probe" in " ".join(cmd)
    assert "gmixout_p0.95=1e-4,3e-4,1e-3" in cmd and "method.p=0.95" in " ".join(cmd)
    assert "gmixout_p0.98=3e-5,1e-4,3e-4" in cmd  # a step lower: s = 50 moves each kept entry further
    # two levers together, picked on targets: a standalone row, outside the family
    assert "gmixout_p0.95_lam0.3=1e-4,3e-4,1e-3" in cmd and "method.p=0.95 method.lam=0.3" in " ".join(cmd)
    assert cmd.count("--grid") == len(pacs.GRIDS)  # every row's grid, three points each
    ns.variants = []
    cmd = pacs.command(ns, "sketch")
    assert "--family" not in cmd and "gmixout_filter=3e-5,1e-4,3e-4" not in cmd  # no grid for an absent row


def test_levers_join_gmixouts_family_with_valid_fields_and_their_own_grids(tmp_path: Path) -> None:
    from gmixout_cli.config.load import build_config, parse_overrides

    ns = _args(tmp_path, [*pacs.VARIANTS, *pacs.LEVERS], [*pacs.GRIDS, *pacs.LEVER_GRIDS], dry_run=False)
    cmd = pacs.command(ns, "sketch")
    members = cmd[cmd.index("--family") + 1].partition("=")[2].split(",")
    assert members == ["gmixout", "gmixout_filter", "gmixout_p0.95", "gmixout_p0.98", "gmixout_lam0.3",
                       "gmixout_lam0.7", "gmixout_keep_moments", "gmixout_episodes10", "gmixout_episodes100",
                       "gmixout_bias_norm"]
    assert "gmixout_keep_moments=1e-4,3e-4,1e-3" in cmd
    assert cmd.count("--grid") == len(pacs.GRIDS) + len(pacs.LEVERS)
    for variant in pacs.LEVERS:  # every lever is a field GMixout reads, with a value it accepts
        cfg = build_config(parse_overrides(variant.partition(":")[2].split()))
        assert not cfg.method.problems()
    assert build_config(parse_overrides(["method.reset_moments=false"])).method.reset_moments is False


def test_the_corruption_benchmark_chooses_among_gmixouts_levers_and_keeps_standalone_rows_apart(
        tmp_path: Path) -> None:
    from benchmarks import corruptions

    ns = argparse.Namespace(data=tmp_path / "fmnist_c", backbone="efficientnet_lite0", methods=corruptions.METHODS,
                            seeds="0,1,2", work=tmp_path / "w", image_size=32, steps=600, workers=2,
                            variants=list(corruptions.VARIANTS), dry_run=True)
    cmd = corruptions.command(ns)
    assert cmd[cmd.index("--family") + 1] == ("gmixout=gmixout,gmixout_filter,gmixout_lam0.3,gmixout_lam0.7,"
                                              "gmixout_p0.95,gmixout_p0.98")
    assert "gmixout_episodes300:method.name=gmixout method.episodes=300" in cmd  # a row, not a member
    assert "gmixout_p0.95_lam0.3:method.name=gmixout method.p=0.95 method.lam=0.3" in cmd
    assert cmd.count("--variant") == len(corruptions.VARIANTS) and cmd[-1] == "--dry-run"


def test_pooled_means_every_source_target_pair_per_seed() -> None:
    def report(source: str, ood: dict[str, float], held_out: float) -> dict:
        runs = [{"label": "full", "value": 1e-4, "seed": s, "id": {source: held_out}, "ood": ood} for s in (0, 1)]
        runs.append({"label": "full", "value": 3e-4, "seed": 0, "id": {source: 0.0}, "ood": {"x": 0.0}})  # not kept
        return {"selected": {"full": 1e-4}, "runs": runs}

    table = pacs.pooled({"a": report("a", {"b": 0.5, "c": 0.7}, 0.9), "b": report("b", {"a": 0.3, "c": 0.5}, 0.8)})
    assert table["full"]["pairs"] == 4 and table["full"]["seeds"] == 2
    assert table["full"]["ood_mean"] == pytest.approx(50.0) and table["full"]["id_mean"] == pytest.approx(85.0)
    assert table["full"]["ood_std"] == 0.0


def test_pooled_wise_ft_rows_take_each_seeds_held_out_alpha(tmp_path: Path) -> None:
    def point(alpha: float, held_out: float, ood: float) -> dict:
        return {"alpha": alpha, "id": {"a": held_out}, "ood": {"b": ood, "c": ood}}

    curves = [{"label": "gmixout", "value": 3e-4, "seed": 0, "curve": [point(0.5, 0.9, 0.6), point(1.0, 0.8, 0.4)]},
              {"label": "gmixout", "value": 3e-4, "seed": 1, "curve": [point(0.5, 0.7, 0.2), point(1.0, 0.8, 0.4)]},
              {"label": "gmixout", "value": 1e-3, "seed": 0, "curve": [point(1.0, 1.0, 1.0)]}]  # not the kept lr
    table = pacs.pooled({"a": {"selected": {"gmixout": 3e-4}, "runs": [], "wise": curves}})
    row = table["wise-ft (gmixout)"]
    assert row["seeds"] == 2 and row["pairs"] == 2
    assert row["ood_mean"] == pytest.approx(50.0) and row["id_mean"] == pytest.approx(85.0)  # seed 0: 0.5, seed 1: 1.0

    (tmp_path / "pacs_efficientnet_lite0_photo.json").write_text('{"rows": {}}')  # an earlier harness's report
    with pytest.raises(SystemExit, match="not `gmixout compare` reports"):
        pacs.main(["--report", "--out", str(tmp_path)])


def test_pooled_family_counts_each_sources_chosen_member_and_drops_diverged_seeds(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def run(label: str, seed: int, ood: float, diverged: bool = False) -> dict:
        if diverged:
            return {"label": label, "value": 1e-4, "seed": seed, "diverged": "nan loss", "id": {}, "ood": {}}
        return {"label": label, "value": 1e-4, "seed": seed, "id": {"s": 0.9}, "ood": {"t": ood},
                "held_out_images": 100}

    def point(alpha: float, ood: float) -> dict:
        return {"alpha": alpha, "id": {"s": 0.9}, "ood": {"t": ood}}

    def report(chosen: str, other: str, ood: float) -> dict:
        runs = [run(chosen, s, ood) for s in (0, 1)] + [run(other, 0, 0.0)]  # the unchosen ran seed 0 only
        runs += [run("full", 0, 0.5), run("full", 1, 0.5, diverged=chosen == "gmixout_filter")]
        wise = [{"label": chosen, "value": 1e-4, "seed": s, "curve": [point(0.5, ood / 2), point(1.0, ood)]}
                for s in (0, 1)]
        return {"selected": {"gmixout": 1e-4, "gmixout_filter": 1e-4, "full": 1e-4}, "runs": runs, "wise": wise,
                "families": {"gmixout": {"members": ["gmixout", "gmixout_filter"], "chosen": chosen}},
                "plan": {"seeds": [0, 1], "rows": [{"label": k, "key": "train.lr"} for k in ("gmixout", "full")]
                         + [{"label": "gmixout_filter", "key": "train.lr"}]}}

    reports = {"sketch": report("gmixout", "gmixout_filter", 0.6), "cartoon": report("gmixout_filter", "gmixout", 0.8)}
    table = pacs.pooled(reports)
    assert set(table) == {"gmixout", "full", "wise-ft (gmixout)"}  # the unchosen member is no row of its own
    assert table["gmixout"]["seeds"] == 2 and table["gmixout"]["ood_mean"] == pytest.approx(70.0)
    assert table["gmixout"]["chosen"] == {"sketch": "gmixout", "cartoon": "gmixout_filter"}
    assert table["full"]["seeds"] == 1  # cartoon's seed 1 diverged: missing, as in its own table
    curves = pacs.pooled_curves(reports)
    assert [c["seed"] for c in curves] == [0, 1] and [p["alpha"] for p in curves[0]["curve"]] == [0.5, 1.0]
    assert sorted(curves[0]["curve"][1]["ood"].values()) == [0.6, 0.8]

    for source, r in reports.items():
        (tmp_path / f"pacs_efficientnet_lite0_{source}.json").write_text(json.dumps(r))
    assert pacs.main(["--report", "--out", str(tmp_path)]) == 0
    assert "gmixout_filter (cartoon)" in (tmp_path / "pacs_efficientnet_lite0_pooled.md").read_text()
    rule = json.loads((tmp_path / "pacs_efficientnet_lite0_pooled.json").read_text())["one_se_first_seed"]
    assert set(rule) == {"gmixout", "full"}  # the family by each source's chosen member, as in the table
    assert rule["gmixout"]["ood_mean"] == pytest.approx(70.0)
    assert rule["full"]["selected_ood_mean"] == pytest.approx(50.0)
    assert (tmp_path / "pacs_efficientnet_lite0_pooled.png").stat().st_size > 0
    (tmp_path / "pacs_efficientnet_lite0_sketch_levers.json").write_text(json.dumps(reports["cartoon"]))
    assert pacs.main(["--report", "--levers", "--out", str(tmp_path)]) == 0  # the levers' reports, pooled apart
    levers = json.loads((tmp_path / "pacs_efficientnet_lite0_levers_pooled.json").read_text())
    assert levers["sources"] == ["sketch"] and levers["rows"]["gmixout"]["ood_mean"] == pytest.approx(80.0)

    # a stopped source (its comparison published what it had) stays out of the pooled table until it finishes
    for name, partial in (("photo", {**reports["sketch"], "complete": False}),
                          ("art_painting", {**reports["sketch"], "title": "art_painting: 3 seeds (partial: 1 of 3 "
                                                                          "seeds so far)"})):
        (tmp_path / f"pacs_efficientnet_lite0_{name}.json").write_text(json.dumps(partial))
    assert pacs.main(["--report", "--out", str(tmp_path)]) == 0
    assert "art_painting, photo not finished" in capsys.readouterr().out
    pooled = json.loads((tmp_path / "pacs_efficientnet_lite0_pooled.json").read_text())
    assert pooled["sources"] == ["cartoon", "sketch"]
    for source in ("sketch", "cartoon"):
        (tmp_path / f"pacs_efficientnet_lite0_{source}.json").unlink()
    (tmp_path / "pacs_efficientnet_lite0_pooled.json").unlink()
    assert pacs.main(["--report", "--out", str(tmp_path)]) == 0  # nothing finished: no pooled report at all
    assert not (tmp_path / "pacs_efficientnet_lite0_pooled.json").exists()


@pytest.mark.slow
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


def test_a_published_comparison_carries_its_runs_small_files_to_a_fresh_machine(tmp_path: Path) -> None:
    import json

    from benchmarks.bench_common import publish_compare, restore_runs

    folder = tmp_path / "cmp"
    run = folder / "runs" / "full" / "lr0.0001-s0"
    run.mkdir(parents=True)
    (folder / "compare.json").write_text(json.dumps({"runs": [], "selected": {}}))
    for name, text in (("results.json", "{}"), ("config.yaml", "a: 1\n"), ("wise.json", "[]"),
                       ("model.safetensors", "weights")):
        (run / name).write_text(text)
    stem = tmp_path / "results" / "bench_x"
    publish_compare(folder, stem, {"git_commit": "abc"}, ["compare", "--data", "d d"])
    report = json.loads(stem.with_suffix(".json").read_text())
    assert report["git_commit"] == "abc" and report["compare_command"] == "gmixout compare --data 'd d'"
    fresh = tmp_path / "fresh"
    restore_runs(fresh, stem)
    got = sorted(p.name for p in (fresh / "runs" / "full" / "lr0.0001-s0").iterdir())
    assert got == ["config.yaml", "results.json", "wise.json"]  # never the weights
    (fresh / "runs" / "full" / "lr0.0001-s0" / "results.json").write_text('{"kept": 1}')
    restore_runs(fresh, stem)  # what a machine already has is never overwritten
    assert "kept" in (fresh / "runs" / "full" / "lr0.0001-s0" / "results.json").read_text()


def test_publish_writes_a_running_sources_report_and_nothing_for_a_source_not_started(tmp_path: Path) -> None:
    import json

    folder = tmp_path / "work" / "efficientnet_lite0-sketch"
    (folder / "runs" / "full" / "lr0.0003-s0").mkdir(parents=True)
    (folder / "runs" / "full" / "lr0.0003-s0" / "results.json").write_text("{}")
    (folder / "compare.json").write_text(json.dumps({"runs": [], "selected": {}}))
    out = tmp_path / "results"
    out.mkdir()
    argv = ["--sources", "sketch,cartoon", "--work", str(tmp_path / "work"), "--out", str(out),
            "--data", str(tmp_path / "pacs"), "--variants", "gmixout_p0.95:method.name=gmixout method.p=0.95"]
    assert pacs.main(["--publish", *argv]) == 0
    report = json.loads((out / "pacs_efficientnet_lite0_sketch.json").read_text())
    # the recorded command is the benchmark's own, quoted so that it can be pasted back into a shell
    assert report["source"] == "sketch" and shlex.split(report["command"]) == ["python", "-m", "benchmarks.pacs", *argv]
    assert "--grid" in report["compare_command"] and (out / "pacs_efficientnet_lite0_sketch_runs.tgz").is_file()
    assert not (out / "pacs_efficientnet_lite0_cartoon.json").exists()  # nothing ran there yet
    headline = (out / "pacs_efficientnet_lite0_sketch.json").read_text()
    assert pacs.main(["--publish", "--levers", "--sources", "sketch", "--work", str(tmp_path / "work"),
                      "--out", str(out), "--data", str(tmp_path / "pacs")]) == 0
    levers = json.loads((out / "pacs_efficientnet_lite0_sketch_levers.json").read_text())
    assert "gmixout_bias_norm=1e-4,3e-4,1e-3" in levers["compare_command"]  # the levers' own report...
    assert (out / "pacs_efficientnet_lite0_sketch.json").read_text() == headline  # ...beside the headline's


def test_the_commit_is_dirty_for_changed_code_but_not_for_the_benchmarks_own_reports(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    from benchmarks import bench_common

    def git(*args: str) -> None:
        subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=tmp_path, check=True,
                       capture_output=True)

    (tmp_path / "benchmarks" / "results").mkdir(parents=True)
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text("{}\n")
    git("init", "-q")
    git("add", "-A")
    git("commit", "-qm", "c")
    monkeypatch.setattr(bench_common, "ROOT", tmp_path)
    monkeypatch.setattr(bench_common, "RESULTS", tmp_path / "benchmarks" / "results")
    (tmp_path / "benchmarks" / "results" / "r.json").write_text('{"a": 1}\n')  # a report the run rewrote
    head = bench_common.git_head()
    assert head is not None and len(head) == 40
    (tmp_path / "code.py").write_text("x = 2\n")
    assert bench_common.git_head() == head + "-dirty"


def test_a_shared_setting_reaches_every_row_but_the_probe_starts(tmp_path: Path) -> None:
    from gmixout_cli.compare import build_plan

    ns = _args(tmp_path, [], list(pacs.GRIDS), dry_run=True)
    ns.shared = ["model.head_init=zero"]
    cmd = pacs.command(ns, "sketch")
    assert cmd[cmd.index("data.num_workers=2") + 1] == "model.head_init=zero"
    root = write_domains(tmp_path / "data", per_class=2)
    shared = [f"data.root={root / 'src'}", "model.name=timm:test_efficientnet", "model.weights=random",
              "model.head_init=zero"]
    plan = build_plan("gmixout_mobilenet_v2", shared, ["lp", "lpft", "gmixout"], [], {}, [0], [], [0.0], 2)
    heads = {r.label: plan.config(r, 1e-4, 0).model.head_init for r in plan.rows}
    assert heads == {"lp": "auto", "lpft": "auto", "gmixout": "zero"}  # auto: the probe for both
