"""The `gmixout` command end to end on CPU: finetune, evaluate --json, merge, profile, recipes, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from gmixout_cli.cli.app import app

TINY = ["--model", "timm:test_efficientnet", "model.weights=random", "data.image_size=32", "train.epochs=2",
        "train.batch_size=8", "data.num_workers=0", "train.log_every=2", "train.lr=1e-3", "train.precision=fp32",
        "train.warmup_steps=0", "train.eval_batch_size=16"]
runner = CliRunner()


def gmixout(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real console entry point in a subprocess (exit codes and stderr as a user sees them)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", COLUMNS="200")
    return subprocess.run([sys.executable, "-m", "gmixout_cli", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def gmixout_main(*args: str) -> subprocess.CompletedProcess:
    """The console entry point `main()` in this process (what `gmixout` runs after its imports), its exit code
    and output captured as a subprocess's would be: cheaper than a new interpreter per error path."""
    import contextlib
    import io

    from gmixout_cli.cli import app as cli_app

    out, err = io.StringIO(), io.StringIO()
    argv, code = sys.argv, 0
    sys.argv = ["gmixout", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            cli_app.main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["gmixout", *args], code, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from conftest import write_domains

    root = write_domains(tmp_path_factory.mktemp("data"))
    out = tmp_path_factory.mktemp("runs") / "run"
    result = runner.invoke(app, ["finetune", "--data", str(root / "src"), "--out", str(out), *TINY,
                                 "method.p=0.8", "method.episodes=3"])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return out


def test_finetune_writes_the_run_folder(run_dir: Path) -> None:
    names = {p.name for p in run_dir.iterdir()}
    assert {"config.yaml", "metrics.jsonl", "model.safetensors", "results.json", "init_head.safetensors"} <= names
    lines = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert lines and {"step", "loss", "lr", "images_per_s", "memory_bytes"} <= set(lines[0])
    results = json.loads((run_dir / "results.json").read_text())
    assert results["method_summary"]["episodes"] == 3
    assert set(results["ood"]) == {"tgt"} and 0.0 <= results["ood_avg"] <= 1.0
    assert not [p for p in run_dir.iterdir() if p.name.endswith(".tmp")]


def test_evaluate_json_matches_the_trainer(run_dir: Path) -> None:
    result = runner.invoke(app, ["evaluate", str(run_dir), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output
    scores = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(scores) >= {"model", "id", "ood", "ood_avg"}
    assert scores["model"] == "timm:test_efficientnet"
    trained = json.loads((run_dir / "results.json").read_text())
    assert scores["id"] == trained["id"] and scores["ood"] == trained["ood"]  # the file is the model: zero overhead
    assert all(0.0 <= v <= 1.0 for v in [*scores["id"].values(), *scores["ood"].values()])


def test_merge_wise_ft_endpoints(run_dir: Path, tmp_path: Path) -> None:
    tuned = load_file(str(run_dir / "model.safetensors"))
    ends = {}
    for alpha in ("0", "1", "0.5"):
        out = tmp_path / f"a{alpha}.safetensors"
        result = runner.invoke(app, ["merge", str(run_dir), "--alpha", alpha, "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        ends[alpha] = load_file(str(out))
    head = load_file(str(run_dir / "init_head.safetensors"))
    assert all((ends["1"][k] == tuned[k]).all() for k in tuned)
    assert (ends["0"]["classifier.weight"] == head["weight"]).all()
    key = "conv_stem.weight"
    assert ((ends["0.5"][key] - (ends["0"][key] + tuned[key]) / 2).abs().max() < 1e-6)
    result = runner.invoke(app, ["evaluate", str(tmp_path / "a0.5.safetensors"), "--json", "--workers", "0"])
    assert result.exit_code == 0, result.output


def test_merge_alpha_sweep_and_soups(run_dir: Path, tmp_path: Path) -> None:
    from safetensors import safe_open

    sweep = tmp_path / "sweep.safetensors"
    result = runner.invoke(app, ["merge", str(run_dir), "--alpha", "0,1", "--out", str(sweep)])
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads(safe_open(str(sweep), "pt").metadata()["merge"])
    assert set(info["held_out_top1"]) == {"0.0", "1.0"}
    assert info["alpha"] == max((s, float(a)) for a, s in info["held_out_top1"].items())[1]
    tuned = load_file(str(run_dir / "model.safetensors"))
    for method in ("uniform", "greedy", "monosoup"):
        out = tmp_path / f"{method}.safetensors"
        args = [str(run_dir)] * (1 if method == "monosoup" else 2)
        result = runner.invoke(app, ["merge", *args, "--method", method, "--out", str(out)])
        assert result.exit_code == 0, result.output + repr(result.exception)
        merged = load_file(str(out))
        assert merged.keys() == tuned.keys()
        if method != "monosoup":  # a soup of one model with itself is that model
            assert all(torch.allclose(merged[k].float(), tuned[k].float()) for k in tuned)
    bad = runner.invoke(app, ["merge", str(run_dir), "--method", "uniform"])
    assert bad.exit_code != 0 and "at least two runs" in str(bad.exception)


def test_profile_reports_memory_and_budget(domains: Path) -> None:
    result = runner.invoke(app, ["profile", "--json", "--steps", "2", "--data", str(domains / "src"), *TINY])
    assert result.exit_code == 0, result.output + repr(result.exception)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["peak_memory_bytes"] > 0 and report["fits"] is True and report["images_per_s"] > 0
    # CPU: the RSS before the model was built is part of the peak, which includes it
    assert 0 < report["process_baseline_bytes"] < report["peak_memory_bytes"]
    state = report["state_bytes"]
    assert state["sparse_values"] > 0 and state["sparse_indices"] == state["sparse_values"]
    # two fp32 moments for each sparse value and each dense head entry, nothing full-size for the targets
    assert state["optimizer_moments"] == 8 * report["method_summary"]["trainable_entries_per_episode"]
    assert report["state_total_bytes"] < report["full_finetune_state_bytes"]
    tight = runner.invoke(app, ["profile", "--json", "--steps", "1", "--budget", "0.1", *TINY])
    assert json.loads(tight.stdout.strip().splitlines()[-1])["fits"] is False


def test_profile_reports_out_of_memory_as_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    from gmixout_cli.training.loop import Trainer

    calls = {"n": 0}
    real_step = Trainer.train_step

    def step_then_oom(self, x, y):  # the warm-up fits, the first timed step does not
        calls["n"] += 1
        if calls["n"] > 1:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_step(self, x, y)

    monkeypatch.setattr(Trainer, "train_step", step_then_oom)
    as_json = runner.invoke(app, ["profile", "--json", "--steps", "1", *TINY])
    assert as_json.exit_code == 0, as_json.output + repr(as_json.exception)
    report = json.loads(as_json.stdout.strip().splitlines()[-1])
    assert report["oom"] is True and report["fits"] is False
    calls["n"] = 0
    table = runner.invoke(app, ["profile", "--steps", "1", *TINY])
    assert table.exit_code == 0 and "does not fit" in table.output and "train.micro_batch_size=4" in table.output


def test_recipes_and_cp(tmp_path: Path) -> None:
    listed = runner.invoke(app, ["recipes"])
    assert listed.exit_code == 0 and "quickstart" in listed.output and "gmixout" in listed.output
    copied = runner.invoke(app, ["cp", "quickstart", str(tmp_path)])
    assert copied.exit_code == 0 and (tmp_path / "quickstart.yaml").is_file()
    again = runner.invoke(app, ["cp", "quickstart", str(tmp_path)])
    assert again.exit_code != 0


def _one_line_error(proc: subprocess.CompletedProcess, *fragments: str) -> None:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.slow
def test_error_paths_exit_2_with_one_line(domains: Path, tmp_path: Path, run_dir: Path) -> None:
    # the first through a new interpreter, as a user runs it; the others through the same main() in this process
    _one_line_error(gmixout("finetune", "--data", str(tmp_path / "nowhere" / "x"), "--out", str(tmp_path / "r1")),
                    "nowhere")
    _one_line_error(gmixout_main("finetune", "--data", str(domains / "src"), "train.lrr=1"), "train.lrr", "train.lr")
    _one_line_error(gmixout_main("finetune", "--data", str(domains / "src"), "--model", "resnet9000"),
                    "unknown model 'resnet9000'")
    _one_line_error(gmixout_main("finetune", "--data", str(domains / "src"), "--model", "timm:test_vit",
                                 "--out", str(tmp_path / "r2")), "model.weights=random")
    assert not (tmp_path / "r2").exists()  # a run that never started leaves no folder behind
    (domains / "src" / "red" / "000.png").write_bytes(b"not an image at all")
    _one_line_error(gmixout_main("finetune", "--data", str(domains / "src"), *TINY, "--out", str(tmp_path / "r3")),
                    "000.png")
    other = tmp_path / "other.safetensors"
    import torch
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(other), metadata={"format": "gmixout/1", "library": "timm",
                                                          "arch": "test_vit", "class_names": "[]"})
    _one_line_error(gmixout_main("merge", str(run_dir), "--base", str(other),
                                 "--out", str(tmp_path / "m.safetensors")), "cannot merge")
    _one_line_error(gmixout_main("evaluate", str(tmp_path / "missing-run")), "missing-run")
    _one_line_error(gmixout_main("finetune", "--recipe", "nope"), "unknown recipe 'nope'")
    _one_line_error(gmixout_main("finetune", "--data", str(domains / "src"), "--out", str(run_dir)), "already exists")


@pytest.mark.slow
def test_unreadable_images_skipped_on_request_with_a_count(domains: Path, tmp_path: Path) -> None:
    (domains / "src" / "red" / "001.png").write_bytes(b"truncated")
    (domains / "tgt" / "blue" / "002.png").write_bytes(b"\x89PNG\r\n")
    proc = gmixout("finetune", "--data", str(domains / "src"), *TINY, "train.epochs=1", "data.unreadable=skip",
                   "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stderr
    assert "skipped 1 unreadable image in the training domain src" in proc.stderr
    assert "skipped 1 unreadable image in the out-of-domain set tgt" in proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["skipped_unreadable"] == 2


def test_methods_lists_each_method_with_its_fields() -> None:
    result = runner.invoke(app, ["methods"], env={"COLUMNS": "250"})
    assert result.exit_code == 0, result.output
    assert "randmask" in result.output and "lam=0.0 (fixed)" in result.output
    assert "head: linear_probe" in result.output and "lora_dropout=0.0" in result.output


def test_evaluate_losing_a_loader_worker_is_one_line(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import gmixout_cli.eval as evaluation

    def lost(*args, **kwargs) -> None:  # noqa: ANN002, ANN003 - what torch raises when a worker was killed
        raise RuntimeError("DataLoader worker (pid 4242) is killed by signal: Killed.")

    monkeypatch.setattr(evaluation, "evaluate_domains", lost)  # imported at call time
    done = gmixout_main("evaluate", str(run_dir), "--workers", "0")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "a data loader worker exited unexpectedly" in done.stderr and "--workers N" in done.stderr
