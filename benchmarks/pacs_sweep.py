"""GMixout's defaults tuned on a PACS source's crossval split only (never its test list or another domain).

    python -m benchmarks.pacs_sweep --source art_painting

Each variant changes one setting of the backbone's gmixout recipe (one at a time around the defaults), at
the benchmark's budget (--epochs, --image-size, --batch-size as in pacs.py) and the recipe's lr, for each
of --seeds. Writes benchmarks/results/pacs_sweep_<backbone>_<source>.{json,md}: crossval top-1 per variant
and seed, the mean, and the paired difference from the defaults (same seed: same head start and data
order) with its spread over seeds. A variant earns a default change only when its mean paired gain is
larger than that spread. Runs are cached under --work like pacs.py's.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks import pacs
from benchmarks.bench_common import ROOT, device_name, git_head
from gmixout_cli.config import config_to_dict, flatten_dict, load_config, parse_overrides
from gmixout_cli.utils.io import write_json, write_text

VARIANTS: dict[str, list[str]] = {
    "default": [],
    "p=0.7": ["method.p=0.7"],
    "p=0.97": ["method.p=0.97"],
    "episodes=5": ["method.episodes=5"],
    "episodes=10": ["method.episodes=10"],
    "lam=0": ["method.lam=0"],
    "lam=0.9": ["method.lam=0.9"],
    "export=last": ["method.export=last"],
    "train_bias_norm=true": ["method.train_bias_norm=true"],
    "head_init=zero": ["model.head_init=zero"],
    "head_init=linear_probe": ["model.head_init=linear_probe"],
}
# Which tensors are targets, per backbone (names differ between timm and torchvision).
TARGET_VARIANTS: dict[str, dict[str, list[str]]] = {
    "efficientnet_lite0": {
        "targets=pointwise": ['model.targets=["*conv_pw*.weight","conv_head.weight"]'],  # no stem, no depthwise
        "targets=late": ['model.targets=["blocks.[4-6].*conv*.weight","conv_head.weight"]'],  # last 3 stages
    },
    "mobilenet_v2": {
        "targets=pointwise": [
            'model.targets=["features.[2-9].conv.0.0.weight","features.1[0-7].conv.0.0.weight",'
            '"features.[2-9].conv.2.weight","features.1[0-7].conv.2.weight","features.1.conv.1.weight",'
            '"features.18.0.weight"]'],
        "targets=late": ['model.targets=["features.1[1-7].conv.[01].0.weight","features.1[1-7].conv.2.weight",'
                         '"features.18.0.weight"]'],
    },
}


def all_variants(backbone: str) -> dict[str, list[str]]:
    return {**VARIANTS, **TARGET_VARIANTS[backbone]}


def variants_for(backbone: str) -> dict[str, list[str]]:
    """The variants that change something in the backbone's recipe (one that restates it is the default)."""
    recipe = flatten_dict(config_to_dict(load_config(f"gmixout_{backbone}", [])))
    if recipe["model.head_init"] == "auto":  # auto is the linear probe on these ImageNet backbones
        recipe["model.head_init"] = "linear_probe"
    table = all_variants(backbone)
    return {name: ov for name, ov in table.items()
            if not ov or any(recipe.get(k) != v for k, v in flatten_dict(parse_overrides(ov)).items())}


def paired(scores: dict[str, float], base: dict[str, float]) -> dict[str, float | None]:
    """Mean and sample std over seeds of (variant - default) crossval top-1, seed by seed."""
    diffs = [scores[s] - base[s] for s in scores if s in base]
    if not diffs:
        return {"mean": None, "std": None}
    return {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else None}


def pool(out_dir: Path, backbone: str, settings: dict) -> dict:
    """Paired gains over every (source, seed) of this backbone's per-source sweeps run with the same settings."""
    def budget(s: dict) -> dict:  # the settings that must match; the seeds may differ
        return {k: v for k, v in s.items() if k != "seeds"}

    sweeps = []
    for path in sorted(out_dir.glob(f"pacs_sweep_{backbone}_*.json")):
        data = json.loads(path.read_text())
        if data.get("benchmark") == "pacs_sweep" and budget(data["settings"]) == budget(settings):
            sweeps.append(data)
    rows: dict[str, dict] = {}
    for data in sweeps:
        base = data["variants"]["default"]["crossval"]
        for variant, row in data["variants"].items():
            if variant == "default":
                continue
            r = rows.setdefault(variant, {"sources": [], "diffs": []})
            r["sources"].append(data["source"])
            r["diffs"] += [row["crossval"][s] - base[s] for s in row["crossval"] if s in base]
    for r in rows.values():
        d = r["diffs"]
        r["mean"] = statistics.fmean(d)
        r["std"] = statistics.stdev(d) if len(d) > 1 else None
        r["passes"] = r["std"] is not None and r["mean"] > r["std"]  # the rule: gain larger than its spread
    return {"sources": [d["source"] for d in sweeps], "settings": budget(settings), "variants": rows}


def pooled_markdown(backbone: str, pooled: dict) -> str:
    lines = [f"### GMixout defaults, {backbone}: paired crossval gain over every source and seed "
             f"(sources: {', '.join(pooled['sources'])})", "",
             "| variant | sources | pairs | gain vs default | passes (gain > spread) |", "|---|---|---|---|---|"]
    for variant, r in sorted(pooled["variants"].items(), key=lambda kv: -kv[1]["mean"]):
        spread = f" ± {100 * r['std']:.1f}" if r["std"] is not None else ""
        lines.append(f"| {variant} | {', '.join(r['sources'])} | {len(r['diffs'])} | "
                     f"{100 * r['mean']:+.1f}{spread} | {'yes' if r['passes'] else 'no'} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs_sweep", description=__doc__.split("\n\n")[0])
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--source", default="art_painting")
    ap.add_argument("--variants", default=None, help="comma-separated (default: all, targets included)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pacs")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "pacs-bench")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    commit, started = git_head(), time.perf_counter()
    seeds = [int(s) for s in args.seeds.split(",")]
    table = variants_for(args.backbone)
    names = args.variants.split(",") if args.variants else list(table)
    restated = [v for v in names if v not in table and v in all_variants(args.backbone)]
    if restated:
        ap.error(f"variant(s) {', '.join(restated)} restate the {args.backbone} recipe's defaults: leave them out")
    unknown = [v for v in names if v not in table]
    if unknown:
        ap.error(f"unknown variant(s) {', '.join(unknown)}: choose from {', '.join(table)}")
    rows = {}
    for variant in dict.fromkeys(["default", *names]):  # the defaults are every variant's reference
        scores = []
        for seed in seeds:
            run_args = argparse.Namespace(**vars(args), set=table[variant])
            run_dir = pacs.train_run(run_args, args.source, "gmixout", args.lr, seed)
            scores.append(json.loads((run_dir / "results.json").read_text())["id"][args.source])
        crossval = dict(zip(map(str, seeds), scores, strict=False))
        rows[variant] = {"overrides": table[variant], "crossval": crossval, "mean": statistics.fmean(scores),
                         "vs_default": paired(crossval, rows["default"]["crossval"] if rows else crossval)}
        print(f"  {variant}: crossval {rows[variant]['mean']:.4f}", flush=True)
    stem = args.out / f"pacs_sweep_{args.backbone}_{args.source}"
    settings = {"epochs": args.epochs, "image_size": args.image_size, "batch_size": args.batch_size,
                "lr": args.lr, "seeds": seeds, "recipe": f"gmixout_{args.backbone}"}
    write_json(stem.with_suffix(".json"), {
        "benchmark": "pacs_sweep", "backbone": args.backbone, "source": args.source, "selection_split": "crossval",
        "device": device_name(torch.device("cpu")), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "git_commit": commit, "command": " ".join(["python", "-m", "benchmarks.pacs_sweep", *sys.argv[1:]]),
        "settings": settings,
        "variants": rows, "wall_time_s": time.perf_counter() - started,
    })
    lines = [f"### GMixout defaults, {args.backbone}, source {args.source}: crossval top-1 % "
             f"({args.epochs} epochs, {args.image_size} px, lr {args.lr:g}, seeds {args.seeds})", "",
             "| variant | crossval | vs default (paired) | per seed |", "|---|---|---|---|"]
    for variant, row in rows.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in row["crossval"].values())
        d = row["vs_default"]
        delta = "" if variant == "default" else f"{100 * d['mean']:+.1f}" + (
            f" ± {100 * d['std']:.1f}" if d["std"] is not None else "")
        lines.append(f"| {variant} | {100 * row['mean']:.1f} | {delta} | {per_seed} |")
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"pacs_sweep: wrote {stem}.json, .md", flush=True)
    pooled = pool(args.out, args.backbone, settings)
    pooled_stem = args.out / f"pacs_sweep_{args.backbone}_pooled"
    write_json(pooled_stem.with_suffix(".json"), {"benchmark": "pacs_sweep_pooled", "backbone": args.backbone,
                                                  "git_commit": commit, **pooled})
    write_text(pooled_stem.with_suffix(".md"), pooled_markdown(args.backbone, pooled))
    print(f"pacs_sweep: pooled {', '.join(pooled['sources'])} into {pooled_stem}.md", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
