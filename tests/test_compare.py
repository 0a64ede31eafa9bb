"""`gmixout compare`: the selection protocol, the plan's checks, and the command end to end on tiny domains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from rich.console import Console

from conftest import write_domains
from gmixout_cli.compare import Comparison, build_plan
from gmixout_cli.compare.plan import extend, series_grid

TINY = ["--model", "timm:test_efficientnet", "model.weights=random", "data.image_size=32", "train.epochs=1",
        "train.batch_size=8", "data.num_workers=0", "train.eval_batch_size=32", "model.head_init=zero"]


def test_default_grids_follow_the_1_3_10_series_and_grow_past_an_edge() -> None:
    assert series_grid(1e-4) == [3e-5, 1e-4, 3e-4]
    assert series_grid(3e-4) == [1e-4, 3e-4, 1e-3]
    assert extend([3e-5, 1e-4, 3e-4], upward=False) == 1e-5
    assert extend([3e-5, 1e-4, 3e-4], upward=True) == 1e-3
    assert extend([2e-4, 4e-4, 8e-4], upward=True) == 1.6e-3  # off the series: the grid's own ratio
    assert extend([2e-4, 4e-4, 8e-4], upward=False) == 1e-4


def _fake_comparison(tmp_path: Path, peak: float, max_extensions: int = 3,
                     ood: dict[str, float] | None = None, id_test: list[str] | None = None,
                     ) -> tuple[Comparison, list[float]]:
    """A comparison whose runs are replaced by a held-out score peaked at `peak` (log scale)."""
    import math

    root = write_domains(tmp_path / "data", per_class=4)
    plan = build_plan(None, [f"data.root={root / 'src'}", *TINY[2:], "model.name=timm:test_efficientnet"],
                      ["full"], [], {"full": [3e-5, 1e-4, 3e-4]}, [0, 1], [], [0.0, 1.0], max_extensions, id_test)
    comparison = Comparison(plan, tmp_path / "out", Console(file=open(tmp_path / "log", "w")), lambda s: None)
    trained: list[float] = []

    def train(row, key):  # noqa: ANN001
        trained.append(key.value)
        score = 1.0 - abs(math.log10(key.value) - math.log10(peak)) / 10
        scores = ood or {"tgt": 0.5}
        comparison.results[(key.label, key.value, key.seed)] = {"id": {"src": score}, "ood": scores,
                                                                "ood_avg": sum(scores.values()) / len(scores)}
        return comparison.results[(key.label, key.value, key.seed)]

    comparison.train = train  # type: ignore[method-assign]
    return comparison, trained


def test_a_best_value_at_the_edge_grows_the_grid_until_it_is_inside(tmp_path: Path) -> None:
    comparison, trained = _fake_comparison(tmp_path, peak=3e-6)
    comparison.run()
    # 3e-5 is best at first (the low edge): 1e-5, then 3e-6 (still the edge), then 1e-6 brackets it
    assert sorted(comparison.grids["full"]) == [1e-6, 3e-6, 1e-5, 3e-5, 1e-4, 3e-4]
    assert comparison.selected["full"] == 3e-6
    assert trained == [3e-5, 1e-4, 3e-4, 1e-5, 3e-6, 1e-6, 3e-6]  # the second seed at the kept value


def test_the_grid_stops_growing_after_max_extensions_and_the_edge_is_reported(tmp_path: Path) -> None:
    from gmixout_cli.compare.report import summarise

    comparison, _ = _fake_comparison(tmp_path, peak=1e-9, max_extensions=1)
    state = comparison.run()
    assert sorted(comparison.grids["full"]) == [1e-5, 3e-5, 1e-4, 3e-4]
    assert comparison.selected["full"] == 1e-5
    state["runs"] = [{**r, "linear_probe": None} for r in state["runs"]]
    assert summarise(state)["full"]["at_edge"] is True


def test_an_id_test_domain_is_reported_apart_and_left_out_of_the_ood_mean(tmp_path: Path) -> None:
    from gmixout_cli.compare.report import markdown, oracle, summarise

    comparison, _ = _fake_comparison(tmp_path, peak=1e-4, ood={"clean": 0.9, "fog": 0.5, "noise": 0.3},
                                     id_test=["clean"])
    state = comparison.run()
    state["runs"] = [{**r, "linear_probe": None} for r in state["runs"]]
    summary = summarise(state)
    assert summary["full"]["ood_mean"]["mean"] == pytest.approx(40.0)  # fog and noise only
    assert summary["full"]["clean"]["mean"] == pytest.approx(90.0)
    assert oracle(state)["full"]["ood_mean"] == pytest.approx(40.0)
    header = markdown(state, summary, ["clean", "fog", "noise"], "t").splitlines()[2]
    assert "| clean (ID test) | fog | noise | OOD mean |" in header


def test_a_row_is_below_its_start_only_beyond_the_held_out_splits_noise() -> None:
    from gmixout_cli.compare.report import start_gap

    sized = [{"held_out_images": 600}]  # standard error at 80%: 1.6 points
    assert not start_gap(80.0, 79.0, sized) and start_gap(80.0, 78.0, sized)
    assert start_gap(80.0, 79.0, [{}])  # the split's size unknown: any drop counts


def test_the_one_se_rule_takes_the_lowest_lr_the_held_out_split_cannot_tell_from_the_best() -> None:
    from gmixout_cli.compare.report import markdown, one_se

    def run(label: str, value: float, held: float, ood: float, seed: int = 0) -> dict:
        return {"label": label, "value": value, "seed": seed, "id": {"src": held}, "ood": {"tgt": ood},
                "held_out_images": 400}  # standard error at 92%: 1.36 points

    state = {"plan": {"seeds": [0, 1], "rows": [{"label": "full", "key": "train.lr", "initial_grid": [1e-4, 3e-4]},
                                                {"label": "probe", "key": "train.head_lr"},
                                                {"label": "l2", "key": "method.l2"}]},
             "selected": {"full": 1e-3, "probe": 1e-2, "l2": 1.0},
             "runs": [run("full", 1e-4, 0.91, 0.66), run("full", 3e-4, 0.89, 0.64), run("full", 1e-3, 0.92, 0.60),
                      run("full", 1e-3, 0.50, 0.10, seed=1),  # other seeds never choose
                      run("probe", 3e-3, 0.85, 0.50), run("probe", 1e-2, 0.88, 0.55),
                      run("l2", 0.1, 0.90, 0.5), run("l2", 1.0, 0.91, 0.5)]}  # not a learning rate: no rule
    rule = one_se(state)
    assert set(rule) == {"full", "probe"}
    assert rule["full"]["value"] == 1e-4 and rule["full"]["ood_mean"] == pytest.approx(66.0)
    assert rule["full"]["selected_ood_mean"] == pytest.approx(60.0)
    assert rule["full"]["se"] == pytest.approx(1.357, abs=1e-3)
    assert rule["probe"]["value"] == 1e-2  # 3 points below the best: the split tells them apart
    table = markdown(state, {}, ["tgt"], "t")
    assert "| full | 0.001 | 0.0001 | 1.4 | 92.0 / 60.0 | 91.0 / 66.0 |" in table
    # every grid value of the first seed, the kept one in bold, one the grid grew to marked
    assert "| full | 0.0001: 91.0 / 66.0, 0.0003: 89.0 / 64.0, **0.001: 92.0 / 60.0 (grown)** |" in table
    assert one_se({**state, "runs": [{k: v for k, v in r.items() if k != "held_out_images"}
                                     for r in state["runs"]]}) == {}  # the split's size unknown: no rule


@pytest.mark.parametrize(("args", "message"), [
    (["--methods", "full,nosuch"], "unknown method 'nosuch'"),
    (["--methods", "", "--variant", "frozen:method.norm_stats=frozen"], "names no method"),
    (["--methods", "full", "--variant", "x:method.name=full train.epochs=3"], "the budget and data are the same"),
    (["--methods", "full", "--grid", "gmixout=1e-4,3e-4"], "'gmixout' in --grid/--wise is not a row"),
    (["--methods", "full", "--grid", "full=1e-4"], "at least two distinct values"),
    (["--methods", "full", "train.lr=1e-3"], "set by the comparison itself"),
    (["--methods", "full", "--seeds", "0,0"], "repeats a seed"),
    (["--methods", "full", "--id-test", "nosuch"], "'nosuch', which is not a test domain"),
])
def test_plan_problems_are_one_line_and_exit_2(cli, tmp_path: Path, args: list[str], message: str) -> None:  # noqa: ANN001
    root = write_domains(tmp_path / "data", per_class=2)
    code, out, err = cli("compare", "-d", str(root / "src"), *TINY, *args)  # default --wise: only existing rows
    assert code == 2 and message in err and "Traceback" not in err + out
    assert not (Path("compare").exists() and any(Path("compare").iterdir()))


@pytest.mark.slow
def test_compare_end_to_end_resumes_and_refuses_another_budget(cli, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.chdir(tmp_path)
    root = write_domains(tmp_path / "data", ("src", "tgt", "tgt2"), per_class=6)
    out = tmp_path / "cmp"
    args = ["compare", "-d", str(root / "src"), *TINY, "--methods", "full,gmixout", "--seeds", "0,1",
            "--grid", "full=1e-3,1e-2", "--grid", "gmixout=1e-3,1e-2", "--max-extensions", "1",
            "--wise", "gmixout", "--alphas", "0,0.5,1", "--out", str(out)]

    code, stdout, err = cli(*args[:-2], "--out", str(out), "--dry-run")
    assert code == 0, err
    assert "estimated time" in stdout and "full" in stdout and not (out / "runs").exists()

    code, stdout, err = cli(*args)
    assert code == 0, err
    report = json.loads((out / "compare.json").read_text())
    assert set(report["summary"]) == {"full", "gmixout", "wise-ft (gmixout)"}
    assert report["complete"] is True  # the whole plan ran (a report written on the way says False)
    for label in ("full", "gmixout"):
        grid = report["grids"][label]
        assert 2 <= len(grid) <= 3 and report["selected"][label] in grid
        runs = [r for r in report["runs"] if r["label"] == label]
        assert len(runs) == len(grid) + 1  # the grid at seed 0, seed 1 at the kept value
        assert report["summary"][label]["id"]["n"] == 2 and report["summary"][label]["tgt2"]["n"] == 2
        assert all(r["held_out_images"] > 0 for r in runs)
    curve = report["wise"][0]["curve"]
    assert [p["alpha"] for p in curve] == [0.0, 0.5, 1.0] and set(curve[0]["ood"]) == {"tgt", "tgt2"}
    table = (out / "compare.md").read_text()
    assert "| full" in table and "| gmixout" in table and "wise-ft (gmixout)" in table and "Oracle" in table
    assert "The first seed's grids" in table and "One-standard-error rule" in table
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # cut off before its last run: the same command trains that one alone and keeps the others
    last = out / report["runs"][-1]["dir"]
    kept = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/results.json") if p.parent != last}
    shutil.rmtree(last)
    code, stdout, err = cli(*args)
    assert code == 0, err
    assert (last / "results.json").is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    again = json.loads((out / "compare.json").read_text())
    assert again["selected"] == report["selected"]

    # a run restored without its weights (a report's small files) cannot give a WiSE-FT curve: said, not a traceback
    wise_run = out / next(r["dir"] for r in again["runs"] if r["label"] == "gmixout" and r["seed"] == 0
                          and r["value"] == again["selected"]["gmixout"])
    (wise_run / "wise.json").unlink()
    (wise_run / "model.safetensors").unlink()
    code, _, err = cli(*args)
    assert code == 2 and "not its weights" in err and "Traceback" not in err

    code, _, err = cli(*[a.replace("train.epochs=1", "train.epochs=2") for a in args])
    assert code == 2 and "trained with other settings" in err and "train.epochs" in err


def test_build_plan_resolves_each_rows_tuned_key_and_default_grid(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", per_class=2)
    shared = [f"data.root={root / 'src'}", "model.name=timm:test_efficientnet", "model.weights=random"]
    plan = build_plan("gmixout_efficientnet_lite0", shared, ["lp", "lora", "lpft"],
                      ["frozen:method.name=full method.norm_stats=frozen"], {}, [0], [], [0.0], 2)
    rows = {r.label: r for r in plan.rows}
    assert (rows["lp"].key, rows["lp"].grid) == ("train.head_lr", (3e-4, 1e-3, 3e-3))  # the recipe's head_lr 1e-3
    assert "model.head_init=auto" in rows["lp"].overrides  # a probe starts from the model's own head
    assert "model.head_init=auto" in rows["lpft"].overrides  # the recipe's zero head is not LP-FT's start
    assert (rows["lora"].key, rows["lora"].grid) == ("train.lr", (1e-4, 3e-4, 1e-3))  # 3x the recipe's 1e-4
    assert (rows["frozen"].method, rows["frozen"].grid) == ("full", (3e-5, 1e-4, 3e-4))
    assert plan.config(rows["frozen"], 1e-4, 0).method.norm_stats == "frozen"
    assert any("lp:" in n and "left out" in n for n in plan.notes)  # said once, not once per run


def test_a_diverged_grid_value_is_recorded_and_never_selected(tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    import math

    from gmixout_cli.compare import runner, write_report
    from gmixout_cli.errors import Diverged
    from gmixout_cli.utils.io import write_json

    def fake_finetune(cfg, run_dir, console, resume=False, on_step=None):  # noqa: ANN001
        if cfg.train.lr >= 1e-2:
            raise Diverged(f"loss became nan at step 3: lower train.lr (lr {cfg.train.lr})")
        score = 0.9 - abs(math.log10(cfg.train.lr) + 3.5) / 10  # peaks between 1e-4 and 1e-3
        write_json(run_dir / "results.json", {"id": {"src": score}, "ood": {"tgt": score / 2}, "ood_avg": score / 2})

    monkeypatch.setattr(runner, "finetune", fake_finetune)
    root = write_domains(tmp_path / "data", per_class=4)
    plan = build_plan(None, [f"data.root={root / 'src'}", *TINY[2:], "model.name=timm:test_efficientnet"],
                      ["full"], [], {"full": [1e-3, 1e-2]}, [0, 1], [], [0.0, 1.0], 2)
    out = tmp_path / "out"
    comparison = Comparison(plan, out, Console(file=open(tmp_path / "log", "w")),
                            lambda s: write_report(out, s, "test"))
    state = comparison.run()
    assert (out / "runs/full/lr0.01-s0/diverged.json").is_file()
    assert sorted(comparison.grids["full"]) == [1e-4, 3e-4, 1e-3, 1e-2] and comparison.selected["full"] == 3e-4
    table = (out / "compare.md").read_text()
    assert "0.01†" in table and "**0.0003**" in table
    assert any(r.get("diverged") for r in state["runs"])
    again = Comparison(plan, out, Console(file=open(tmp_path / "log2", "w")), lambda s: None)
    monkeypatch.setattr(runner, "finetune", None)  # nothing may train again: every run is on disk
    assert again.run()["selected"] == state["selected"]


def test_progress_counts_resumed_and_finished_runs_and_projects_the_eta(monkeypatch) -> None:  # noqa: ANN001
    from gmixout_cli.compare import progress

    clock = iter([0.0, 0.0, 100.0, 100.0])  # started, run started, run ended, ...
    monkeypatch.setattr(progress.time, "perf_counter", lambda: next(clock))
    p = progress.PlanProgress(Console(file=open("/dev/null", "w")), steps_per_run=10)
    p.plan([True, False, False, False])  # one run already on disk: done, and free
    assert (p.done, p.total, p.eta()) == (10, 40, None)
    p.start_run("full lr=1e-4 seed 0")
    p.step(4, 10)  # a resumed run reports its first step as 4: steps 1-3 were done before
    for s in range(5, 11):
        p.step(s, 10)
    p.end_run()
    assert p.done == 20 and p.eta() == 2 * 10 * 100.0 / 7  # two runs left at 100 s per 7 steps trained here
    assert "2 runs left, ETA 4m46s" in p.eta_note()
    p.add_runs(1)
    assert p.total == 50 and progress.clock(3725) == "1h02m"
    p.add_runs(1, finished=True)  # a grown grid's run that a continuing comparison finished before
    assert (p.done, p.total) == (30, 60) and "3 runs left" in p.eta_note()


def test_a_partial_report_says_so_and_the_plot_frames_the_rows(tmp_path: Path) -> None:
    from gmixout_cli.compare.report import _frame, write_report

    comparison, _ = _fake_comparison(tmp_path, peak=1e-4)
    state = comparison.run()
    state["runs"] = [{**r, "linear_probe": None} for r in state["runs"]]
    assert write_report(tmp_path / "whole", state, "t")["title"] == "t"
    first = {**state, "runs": [r for r in state["runs"] if r["seed"] == 0]}  # stopped before the second seed
    (tmp_path / "part").mkdir()
    report = write_report(tmp_path / "part", first, "t")
    assert report["title"] == "t (partial: 1 of 2 seeds so far)"
    assert (tmp_path / "part" / "compare.md").read_text().startswith("### t (partial: 1 of 2 seeds so far)")
    assert (tmp_path / "part" / "compare.png").stat().st_size > 0
    # the axes hold every row with its error bars and a margin; a WiSE-FT curve's chance-level end falls outside
    x0, x1, y0, y1 = _frame([(80.0, 60.0, 1.0, 2.0), (90.0, 50.0, 0.0, 0.0)])
    assert x0 < 79.0 and x1 > 90.0 and y0 < 50.0 and y1 > 62.0 and not x0 <= 10.0


def test_a_family_runs_the_later_seeds_with_its_member_chosen_on_held_out(tmp_path: Path) -> None:
    from gmixout_cli.compare.report import markdown, summarise

    root = write_domains(tmp_path / "data", per_class=4)
    plan = build_plan(None, [f"data.root={root / 'src'}", *TINY[2:], "model.name=timm:test_efficientnet"],
                      ["full"], ["full_b:method.name=full train.weight_decay=0.01"], {}, [0, 1], ["full"], [0.0, 1.0],
                      0, None, {"full": ["full", "full_b"]})
    comparison = Comparison(plan, tmp_path / "out", Console(file=open(tmp_path / "log", "w")), lambda s: None)
    trained: list[tuple[str, int]] = []
    interpolated: list[tuple[str, int]] = []
    comparison.wise_curve = lambda row, seed: interpolated.append((row.label, seed))  # type: ignore[method-assign]

    def train(row, key):  # noqa: ANN001 - full_b is better on held-out and worse out of domain
        trained.append((key.label, key.seed))
        results = {"id": {"src": 0.8 if key.label == "full_b" else 0.7}, "ood": {"tgt": 0.2}, "ood_avg": 0.2,
                   "linear_probe": None}
        comparison.results[(key.label, key.value, key.seed)] = results
        return results

    comparison.train = train  # type: ignore[method-assign]
    assert [k.label for _, k in comparison.todo()].count("full_b") == 3  # before the choice: the first counts
    state = comparison.run()
    assert state["families"] == {"full": {"members": ["full", "full_b"], "chosen": "full_b"}}
    assert [t for t in trained if t[1] == 1] == [("full_b", 1)]  # the unchosen member runs the first seed only
    # WiSE-FT asked for the family's first member follows the member chosen, as the runs do
    assert interpolated == [("full", 0), ("full_b", 0), ("full_b", 1)]
    summary = summarise(state)
    assert summary["full_b"]["family"] == "chosen for full" and summary["full"]["family"] == "full: not chosen"
    table = markdown(state, summary, ["tgt"], "t")
    assert "| full_b (chosen for full, on held-out) |" in table
    assert "| full (full: not chosen, first seed only) |" in table


@pytest.mark.parametrize(("families", "message"), [
    ({"g": ["full", "nope"]}, "--family g names 'nope', which is not a row"),
    ({"g": ["full", "full"]}, "--family g needs at least two distinct rows"),
    ({"g": ["full", "lp"], "h": ["lp", "full"]}, "a row is in two --family groups"),
])
def test_family_problems_are_named(tmp_path: Path, families: dict, message: str) -> None:
    from gmixout_cli.errors import UserError

    root = write_domains(tmp_path / "data", per_class=4)
    with pytest.raises(UserError, match=message):
        build_plan(None, [f"data.root={root / 'src'}", *TINY[2:], "model.name=timm:test_efficientnet"],
                   ["full", "lp"], [], {}, [0, 1], [], [0.0, 1.0], 0, None, families)


def test_a_continuing_comparison_counts_later_seeds_already_run_at_the_kept_value(tmp_path: Path) -> None:
    comparison, _ = _fake_comparison(tmp_path, peak=1e-4)
    done = tmp_path / "out" / "runs" / "full" / "lr0.0003-s1"  # kept 3e-4 in an earlier session, not yet reloaded
    done.mkdir(parents=True)
    (done / "results.json").write_text("{}")
    (later,) = [(row, key) for row, key in comparison.todo() if key.seed == 1]
    assert later[1].value == 3e-4 and comparison.finished(*later)  # not the grid's middle, 1e-4, still to run


def test_stale_keys_ignore_machine_and_layout_settings_but_not_results() -> None:
    from gmixout_cli.compare.plan import stale_keys
    from gmixout_cli.config.load import build_config, config_to_dict, parse_overrides

    planned = build_config(parse_overrides(["data.root=/here/sketch", "train.lr=3e-4"]))
    saved = config_to_dict(build_config(parse_overrides(["data.root=/elsewhere/sketch", "train.lr=3e-4",
                                                         "model.memory_format=contiguous"])))
    assert stale_keys(saved, planned) == []  # same domain folder; the layout changes float rounding only
    del saved["model"]["memory_format"]  # a run from before the setting existed
    assert stale_keys(saved, planned) == []
    del saved["method"]["weight_dtype"]  # a setting added after the run, planned at its default: same behaviour
    assert stale_keys(saved, planned) == []
    bf16 = build_config(parse_overrides(["data.root=/here/sketch", "train.lr=3e-4", "method.weight_dtype=bf16"]))
    assert stale_keys(saved, bf16) == ["method.weight_dtype"]  # ... but not at a value the run never had
    saved["train"]["lr"] = 1e-3
    assert stale_keys(saved, planned) == ["train.lr"]


def test_two_rows_that_are_the_same_training_are_named_in_a_note(tmp_path: Path) -> None:
    root = write_domains(tmp_path / "data", per_class=2)
    shared = [f"data.root={root / 'src'}", "model.name=timm:test_efficientnet", "model.weights=random"]
    # MobileNetV2's recipe starts every method from a probe: full fine-tuning is LP-FT there
    plan = build_plan("gmixout_mobilenet_v2", shared, ["full", "lpft", "gmixout"], [], {}, [0], [], [0.0], 2)
    same = [n for n in plan.notes if "same training" in n]
    assert len(same) == 1 and "full and lpft" in same[0] and "linear_probe" in same[0]
    assert "--variant 'full:method.name=full model.head_init=zero'" in same[0]
    # from a zero head, full fine-tuning is its own training again
    plan = build_plan("gmixout_mobilenet_v2", shared, ["lpft"], ["full:method.name=full model.head_init=zero"], {},
                      [0], [], [0.0], 2)
    assert not [n for n in plan.notes if "same training" in n]
