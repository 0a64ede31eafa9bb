"""GMixout with bf16 target weights against fp32 weights on the PACS budget: the same accuracy within seed noise?

    python -m benchmarks.pacs_pack --size 112 --out .pacs112  # once
    python -m benchmarks.bf16_weights --data .pacs112 --source sketch --dry-run
    nohup python -m benchmarks.bf16_weights --data .pacs112 --source sketch &

One `gmixout compare` on one PACS source at the PACS benchmark's budget (EfficientNet-Lite0, 600 steps at
96 px, seeds 0,1,2, learning rate chosen on the source's crossval list): two rows that differ only in how the
target weights are stored, `gmixout_fp32w` and `gmixout_bf16w` (method.weight_dtype=bf16). Both run under
bf16 autocast, which bf16 weights need; within an episode autocast casts the fp32 weights to the very values
the bf16 run stores, so the rows part only by the anchor's stochastic rounding at each fold-in. Per seed the
paired differences (bf16 - fp32) of held-out and out-of-domain accuracy are set against the spread over
seeds; the verdict "within seed noise" asks |mean difference| <= the larger of the two rows' seed std.
Writes benchmarks/results/bf16_weights_<backbone>_<source>.{json,md,png} and _runs.tgz.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    RESULTS,
    ROOT,
    command_line,
    git_head,
    publish_compare,
    restore_runs,
    run_gmixout,
)
from gmixout_cli.compare.report import at_selected
from gmixout_cli.utils.io import write_json

ROWS = {"gmixout_fp32w": "method.name=gmixout", "gmixout_bf16w": "method.name=gmixout method.weight_dtype=bf16"}
GRID = "3e-5,1e-4,3e-4"  # the PACS benchmark's GMixout grid


def command(args: argparse.Namespace) -> list[str]:
    """The `gmixout compare` arguments."""
    cmd = ["compare", "--data", str(args.data / args.source), "--recipe", f"gmixout_{args.backbone}", "--methods",
           "", "--seeds", args.seeds, "--wise", "", "--out", str(args.work), f"data.image_size={args.image_size}",
           f"train.max_steps={args.steps}", "train.epochs=1000", f"data.num_workers={args.workers}",
           "train.precision=bf16"]  # both rows: bf16 weights need a bf16 forward pass
    for label, overrides in ROWS.items():
        cmd += ["--variant", f"{label}:{overrides}", "--grid", f"{label}={GRID}"]
    return cmd + (["--dry-run"] if args.dry_run else [])


def paired(report: dict[str, Any]) -> dict[str, Any]:
    """Per seed, bf16 minus fp32 weights (each row at its chosen rate), in accuracy points."""
    kept: dict[str, dict[int, dict[str, float]]] = {label: {} for label in ROWS}
    for run in at_selected(report, report["runs"]):
        if run["label"] in kept:
            kept[run["label"]][run["seed"]] = {"id": 100 * next(iter(run["id"].values())),
                                               "ood": 100 * run["ood_avg"]}
    fp32, bf16 = kept["gmixout_fp32w"], kept["gmixout_bf16w"]
    seeds = sorted(set(fp32) & set(bf16))
    out: dict[str, Any] = {"seeds": seeds, "lr": {k: report["selected"].get(k) for k in ROWS}}
    for metric in ("id", "ood"):
        diffs = [bf16[s][metric] - fp32[s][metric] for s in seeds]
        spread = [statistics.stdev(r[s][metric] for s in seeds) if len(seeds) > 1 else 0.0 for r in (fp32, bf16)]
        mean = statistics.fmean(diffs) if diffs else 0.0
        out[metric] = {"differences": diffs, "mean_difference": mean,
                       "seed_std": {"fp32": spread[0], "bf16": spread[1]},
                       "within_seed_noise": bool(diffs) and len(seeds) > 1 and abs(mean) <= max(spread)}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.bf16_weights", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--source", default="sketch")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pacs")
    ap.add_argument("--work", type=Path, default=None, help="the comparison's folder (default: runs/bf16_weights/...)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true")
    args = ap.parse_args(argv)
    args.work = args.work or ROOT / "runs" / "bf16_weights" / f"{args.backbone}-{args.source}"
    stem = args.out / f"bf16_weights_{args.backbone}_{args.source}"
    commit = git_head()
    cmd = command(args)
    restore_runs(args.work, stem)
    try:
        run_gmixout(cmd)
    finally:  # a stopped comparison publishes what it has, so the next session continues
        if not args.dry_run and (args.work / "compare.json").is_file():
            publish_compare(args.work, stem, {"benchmark": "bf16_weights", "source": args.source,
                                              "backbone": args.backbone, "git_commit": commit,
                                              "command": command_line("bf16_weights", sys.argv[1:])}, cmd)
            report = json.loads(stem.with_suffix(".json").read_text())
            report["paired"] = paired(report)
            write_json(stem.with_suffix(".json"), report)
            print(json.dumps(report["paired"], indent=1), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
