"""PACS robustness benchmark: every method with the same budget, lr chosen on crossval, several seeds.

    # the CPU run committed in benchmarks/results (EfficientNet-Lite0, photo as source, 128 px)
    python -m benchmarks.pacs --backbone efficientnet_lite0 --sources photo
    # all four sources, both backbones (a GPU: add train.epochs etc. to taste)
    python -m benchmarks.pacs --backbone mobilenet_v2 --sources photo,art_painting,cartoon,sketch --epochs 5

Protocol (README of ../shared/data/pacs): train on the source's official train list, select on its
crossval list, report in-domain top-1 on its official test list and top-1 on every image of each other
domain, plus their mean. Note that PACS's `<domain>_test_kfold.txt` is train + crossval, so the in-domain
test number includes the training images; the crossval column is the held-out in-domain figure (it is
also what selected the learning rate).

Per method: the learning-rate grid runs with seed 0 and the value with the best crossval top-1 is kept
(ties: the first in the grid); that run is seed 0 of the final set, and seeds 1.. rerun it. Every run
goes through the tool itself (`gmixout_cli.training.finetune`, the method's own recipe values as
overrides), and is scored from its exported dense `model.safetensors` rebuilt by `load_classifier`.
WiSE-FT is a curve: each final `lpft` run interpolated with its start (pretrained backbone + linear-probe
head, the convnet analogue of the zero-shot model) at --alphas; the table's WiSE-FT row picks alpha on
crossval per seed.

Runs live under --work (default runs/pacs-bench/) and are reused when complete, so an interrupted
benchmark continues where it stopped. Output: benchmarks/results/pacs_<backbone>_<source>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from benchmarks.bench_common import ROOT, device_name, git_head, versions
from benchmarks.pacs_report import carry_over, write_report
from gmixout_cli.config import config_to_dict, flatten_dict, load_config, read_yaml
from gmixout_cli.data import build_transform, load_domain, load_eval_domain, make_loader
from gmixout_cli.errors import UserError
from gmixout_cli.merge import initial_state, interpolate, load_weights
from gmixout_cli.methods.registry import unread_fields
from gmixout_cli.models import load_classifier
from gmixout_cli.training import finetune
from gmixout_cli.utils.io import write_json, write_yaml

# method -> (overrides on the backbone's gmixout recipe, grid key, CPU grid). `full` is the plain baseline
# (zero head); every other baseline starts from the linear-probe head (pinned: it stays their protocol when
# GMixout's recipe changes its own head_init, as EfficientNet-Lite0's did after the crossval sweep).
LP_HEAD = "model.head_init=auto"  # = linear_probe on these ImageNet backbones (and what cached runs saved)
METHODS: dict[str, tuple[list[str], str, list[float]]] = {
    "full": (["method.name=full", "model.head_init=zero"], "train.lr", [1e-4, 3e-4]),
    "lp": (["method.name=lp", LP_HEAD, "train.lr=0"], "train.head_lr", [1e-3, 1e-2]),
    "lpft": (["method.name=lpft", LP_HEAD, "train.head_lr=null"], "train.lr", [3e-5, 1e-4]),
    "lora": (["method.name=lora", LP_HEAD, "method.r=8", "method.alpha=16"], "train.lr", [3e-4, 1e-3]),
    "dora": (["method.name=dora", LP_HEAD, "method.r=8", "method.alpha=16"], "train.lr", [3e-4, 1e-3]),
    "mlae": (["method.name=mlae", LP_HEAD, "method.r=8", "method.alpha=8", "method.p=0.5"], "train.lr",
             [3e-4, 1e-3]),
    "mixout": (["method.name=mixout", LP_HEAD, "method.p=0.9"], "train.lr", [3e-5, 1e-4]),
    "randmask": (["method.name=randmask", LP_HEAD, "method.p=0.9", "method.episodes=1", "method.lam=0"],
                 "train.lr", [1e-4, 3e-4]),
    "gmixout": (["method.name=gmixout"], "train.lr", [1e-4, 3e-4]),
}
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # training's train.device=auto too
ALPHAS = [0.0, 0.5, 1.0]  # alpha = 1 is the run itself (its scores are reused)


class EvalSets:
    """The source's crossval and test lists and every other domain, decoded once per image size."""

    def __init__(self, data_root: Path, source: str, workers: int) -> None:
        cfg = load_config(None, [f"data.root={data_root / source}"])
        self.data = load_domain(cfg.data)
        self.items = {"crossval": self.data.val, "test": test_items(data_root, source, self.data.classes)}
        self.ood = sorted(d.name for d in data_root.iterdir()
                          if d.is_dir() and d.name not in (source, "splits") and not d.name.startswith("."))
        for name in self.ood:
            self.items[name] = load_eval_domain(self.data, name)
        self.workers = workers
        self._cache: dict[tuple, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}

    def tensors(self, size: int, mean: list[float], std: list[float]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        key = (size, tuple(mean), tuple(std))
        if key not in self._cache:
            tf = build_transform(size, mean, std, train=False)
            self._cache[key] = {}
            for name, items in self.items.items():
                xs, ys = zip(*make_loader(items, tf, 256, False, self.workers, 0), strict=False)
                self._cache[key][name] = (torch.cat(xs), torch.cat(ys))
        return self._cache[key]

    @torch.no_grad()
    def score(self, model: torch.nn.Module, meta: dict[str, str]) -> dict[str, Any]:
        """crossval, test, each other domain and their mean (top-1 fractions)."""
        model.eval()
        # channels-last: ~2x faster CPU inference for these convnets; the loaded copy is only scored here (fp32)
        model = model.to(DEVICE, memory_format=torch.channels_last)
        sets = self.tensors(int(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"]))
        acc = {}
        for name, (x, y) in sets.items():
            correct = 0
            for i in range(0, len(y), 256):
                batch = x[i:i + 256].to(DEVICE).contiguous(memory_format=torch.channels_last)
                correct += (model(batch).argmax(1).cpu() == y[i:i + 256]).sum().item()
            acc[name] = correct / len(y)
        ood = {d: acc[d] for d in self.ood}
        return {"crossval": acc["crossval"], "test": acc["test"], "ood": ood, "ood_mean": sum(ood.values()) / len(ood)}


def test_items(data_root: Path, source: str, classes: list[str]) -> list[tuple[Path, int]]:
    """The official `<source>_test*.txt` list, labels checked against the class-folder order."""
    lists = sorted((data_root / "splits").glob(f"{source}_test*.txt"))
    if len(lists) != 1:
        raise SystemExit(f"pacs: expected one {source}_test*.txt in {data_root / 'splits'}, found {len(lists)}")
    items = []
    for line in lists[0].read_text().splitlines():
        if not line.strip():
            continue
        rel, label = line.rsplit(maxsplit=1)
        cls = Path(rel).parts[-2]
        if classes.index(cls) != int(label) - 1:
            raise SystemExit(f"pacs: {lists[0]} labels {rel} as {label}, but its folder is class {cls}")
        items.append((data_root / rel, int(label) - 1))
    return items


# Where the data and how many loader workers: the same run on another machine (gpu_job.sh) differs there.
MACHINE_KEYS = {"data.root", "data.num_workers"}


def stale_keys(saved: Path, now: dict[str, Any]) -> list[str]:
    """Settings of a cached run's config.yaml that differ from the config resolved now.

    A key the saved file lacks (a field added to the schema later, with the old behaviour as default)
    does not count; nor do MACHINE_KEYS, nor `method.*` fields the run's method never reads (a new GMixout
    default in the shared recipe leaves the LoRA runs valid). A missing or unreadable file counts as changed."""
    try:
        old = flatten_dict(read_yaml(saved))
    except UserError:
        return ["config.yaml"]
    now_flat = flatten_dict(now)
    method = str(now_flat.get("method.name", "gmixout"))
    unread = {f"method.{f}" for f in unread_fields(method, [k[7:] for k in now_flat if k.startswith("method.")])}
    return [k for k, v in old.items()
            if k not in MACHINE_KEYS and k not in unread and k in now_flat and now_flat[k] != v]


def train_run(args: argparse.Namespace, source: str, method: str, value: float, seed: int,
              scores: tuple[str, ...] = ()) -> Path | None:
    """One tool run (reused when complete); returns its folder (None: not run, under --report-only).

    `scores`: the score files phase 2 reads; a run whose folder lost its model (only the small files came
    back from another machine, see gpu_job.sh) and lacks one of them is trained again."""
    overrides, key, _ = METHODS[method]
    name = f"{args.backbone}-{source}-{method}-{key.split('.')[-1]}{value:g}-e{args.epochs}-s{seed}"
    if args.set:  # extra overrides change the run: they are part of its cache key
        name += "-x" + hashlib.sha1("\n".join(args.set).encode()).hexdigest()[:8]
    run_dir = args.work / name
    cfg = load_config(f"gmixout_{args.backbone}", overrides + [
        f"data.root={args.data / source}", "data.ood=[]", f"data.image_size={args.image_size}",
        f"data.num_workers={args.workers}", f"train.epochs={args.epochs}", f"train.batch_size={args.batch_size}",
        f"train.seed={seed}", f"{key}={value}", *args.set])
    if (run_dir / "results.json").is_file() and ((run_dir / "model.safetensors").is_file()
                                                 or all((run_dir / f).is_file() for f in scores)):
        changed = stale_keys(run_dir / "config.yaml", config_to_dict(cfg))
        if not changed:
            return run_dir
        print(f"  {name}: recipe changed since it ran ({', '.join(changed[:4])}): training it again", flush=True)
    if getattr(args, "report_only", False):
        return None
    shutil.rmtree(run_dir, ignore_errors=True)  # a run cut off midway, or from an older recipe, starts again
    run_dir.mkdir(parents=True)
    write_yaml(run_dir / "config.yaml", config_to_dict(cfg))
    t0 = time.perf_counter()
    with open(run_dir / "log.txt", "w") as log:
        finetune(cfg, run_dir, Console(file=log, width=120))
    (run_dir / "device.txt").write_text(device_name(DEVICE) + "\n")  # the report names where runs trained
    print(f"  {name}: {time.perf_counter() - t0:.0f} s", flush=True)
    return run_dir


def scored(sets: EvalSets, run_dir: Path) -> dict[str, Any]:
    """The run's scores from its exported model (cached in the run folder)."""
    path = run_dir / "pacs_scores.json"
    if not path.is_file():
        model, meta = load_classifier(run_dir / "model.safetensors")
        write_json(path, sets.score(model, meta))
    return json.loads(path.read_text())


def wise_curve(sets: EvalSets, run_dir: Path) -> list[dict[str, Any]]:
    """Scores of the run interpolated with its start at every alpha (cached)."""
    path = run_dir / "pacs_wise.json"
    if not path.is_file():
        tuned, meta = load_weights(run_dir / "model.safetensors")
        base = initial_state(run_dir, meta)
        model, _ = load_classifier(run_dir / "model.safetensors")
        curve = []
        for alpha in ALPHAS:
            if alpha == 1.0:
                curve.append({"alpha": alpha, **scored(sets, run_dir)})
                continue
            model.load_state_dict(interpolate(base, tuned, alpha))
            curve.append({"alpha": alpha, **sets.score(model, meta)})
        write_json(path, curve)
    return json.loads(path.read_text())


def bench_source(args: argparse.Namespace, source: str, methods: list[str], started: float) -> Path:
    sets = EvalSets(args.data, source, args.workers)
    records: list[dict[str, Any]] = []
    selection: dict[str, dict[str, Any]] = {}
    for method in methods:  # phase 1: the grid, seed 0, selected on crossval
        _, key, grid = METHODS[method]
        grid = args.grid.get(method, grid)
        crossval = {}
        for value in grid:
            run_dir = train_run(args, source, method, value, args.seeds[0])
            if run_dir is not None:
                crossval[value] = json.loads((run_dir / "results.json").read_text())["id"][source]
        if len(crossval) < len(grid):  # --report-only and the grid is not complete: nothing to report yet
            continue
        best = max(grid, key=lambda v: (crossval[v], -grid.index(v)))
        selection[method] = {"key": key, "grid": grid, "crossval": {f"{v:g}": a for v, a in crossval.items()},
                             "selected": best}
    wise: list[dict[str, Any]] = []
    for seed in args.seeds:  # phase 2: every method at its selected value, seed by seed
        for method in (m for m in methods if m in selection):
            wise_wanted = method == "lpft" and not args.no_wise
            run_dir = train_run(args, source, method, selection[method]["selected"], seed,
                                ("pacs_scores.json", "pacs_wise.json") if wise_wanted else ("pacs_scores.json",))
            if run_dir is None or (args.report_only and not (run_dir / "pacs_scores.json").is_file()):
                continue  # --report-only computes nothing: a run counts once trained and scored
            results = json.loads((run_dir / "results.json").read_text())
            trained_on = run_dir / "device.txt"  # runs from before device.txt trained on this CPU
            records.append({"method": method, "seed": seed, "value": selection[method]["selected"],
                            "device": trained_on.read_text().strip() if trained_on.is_file() else
                            device_name(torch.device("cpu")), **scored(sets, run_dir),
                            "train_time_s": results["train_time_s"], "steps": results["steps"],
                            "summary": results["method_summary"]})
            wise_ready = not args.report_only or (run_dir / "pacs_wise.json").is_file()
            if wise_wanted and wise_ready:
                wise.append({"seed": seed, "curve": wise_curve(sets, run_dir)})
    report = {
        "benchmark": "pacs", "backbone": args.backbone, "source": source, "ood_domains": sets.ood,
        "device": ", ".join(sorted({r["device"] for r in records})) or device_name(DEVICE),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": args.commit, "command": " ".join(["python", "-m", "benchmarks.pacs", *sys.argv[1:]]),
        "versions": versions(("timm", "peft", "torchvision")),
        "settings": {"epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
                     "seeds": args.seeds, "extra_overrides": args.set, "recipe": f"gmixout_{args.backbone}",
                     "method_overrides": {m: METHODS[m][0] for m in methods}},
        "sizes": {name: len(items) for name, items in sets.items.items()},
        "selection": selection, "runs": records, "wise_ft_lpft": wise,
        "wall_time_s": time.perf_counter() - started,
    }
    stem = args.out / f"pacs_{args.backbone}_{source}"
    if args.keep_others:  # rerun some methods (a recipe change), keep the others' rows from the report on disk
        previous = stem.with_suffix(".json")
        if not previous.is_file():
            raise SystemExit(f"--keep-others: no earlier report {previous}; run without it")
        try:
            report = carry_over(report, json.loads(previous.read_text()), methods)
        except ValueError as exc:
            raise SystemExit(f"--keep-others: {exc}") from None
    return write_report(report, stem)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--sources", default="photo", help="comma-separated source domains")
    ap.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated; the first also runs the lr grid")
    ap.add_argument("--grid", action="append", default=[], metavar="METHOD=V1,V2",
                    help="replace a method's grid, e.g. --grid gmixout=1e-4,3e-4 (repeatable)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (part of the run name's budget: keep it fixed); "
                         "a method.* field some chosen method never reads is refused, so pair it with --methods")
    ap.add_argument("--no-wise", action="store_true", help="skip the WiSE-FT curve")
    ap.add_argument("--report-only", action="store_true",
                    help="train and score nothing: report the runs in --work that are trained and scored "
                         "(the table's seeds column says how many)")
    ap.add_argument("--keep-others", action="store_true",
                    help="write the report with the --methods rows new and every other method's rows (and the "
                         "rows replaced) from the report already in --out, at the same budget")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pacs")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "pacs-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.grid = {m: [float(v) for v in vals.split(",")] for m, vals in (g.split("=", 1) for g in args.grid)}
    unknown = [m for m in args.methods.split(",") + list(args.grid) if m not in METHODS]
    if unknown:
        ap.error(f"unknown method(s) {', '.join(unknown)}: choose from {', '.join(METHODS)}")
    if not (args.data / "splits").is_dir():
        ap.error(f"{args.data} has no splits/ folder: point --data at the PACS folder (with its split lists)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.commit = git_head()  # at the start: the code that trained, even if the tree moves on meanwhile
    started = time.perf_counter()
    for source in args.sources.split(","):
        print(f"pacs: {args.backbone}, source {source}", flush=True)
        stem = bench_source(args, source, args.methods.split(","), started)
        print(f"pacs: wrote {stem}.json, .md, .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
