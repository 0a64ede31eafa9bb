"""Robustness to corruptions with `gmixout compare`: train on clean Fashion-MNIST, test on its corrupted copies.

    python -m benchmarks.corruptions --dry-run
    nohup python -m benchmarks.corruptions &          # hours on a 2-core CPU; run it again to continue

The data set is built first if absent (`python -m benchmarks.fmnist_c`: 600 clean training images per class,
200 test images per class clean and under each corruption at severity 3). One `gmixout compare` command
then runs the rows below at one shared budget (`--steps` optimizer steps, so GMixout's 30 episodes last
steps/30 steps each), learning rates chosen on the clean training domain's held-out split at the first
seed, the other seeds at the chosen value, WiSE-FT curves for LP-FT and GMixout. The report goes to
benchmarks/results/fmnist_c_<backbone>.{json,md,png} (test_clean, the clean test images, is the in-distribution
test column, left out of the OOD mean; then each corruption)
with the commit and the command, and the runs' small files to ..._runs.tgz, from which a fresh machine
continues (finished runs are not trained again).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks import fmnist_c
from benchmarks.bench_common import (
    ANCHOR_EMA_ROWS,
    BATCH_STATS_ROW,
    FILTER_MASK_ROW,
    FULL_ROW,
    RESULTS,
    ROOT,
    SPARSE_MASK_ROWS,
    STANDALONE_ROWS,
    command_line,
    git_head,
    lever_families,
    publish_compare,
    restore_runs,
    run_gmixout,
)

METHODS = "lp,lpft,lora,mixout,randmask,gmixout"
VARIANTS = (FULL_ROW, BATCH_STATS_ROW, FILTER_MASK_ROW, *ANCHOR_EMA_ROWS, *SPARSE_MASK_ROWS, *STANDALONE_ROWS)


def command(args: argparse.Namespace) -> list[str]:
    cmd = ["compare", "--data", str(args.data / "clean"), "--recipe", f"gmixout_{args.backbone}",
           "--methods", args.methods, "--seeds", args.seeds, "--wise", "lpft,gmixout", "--out", str(args.work),
           "--id-test", "test_clean",
           f"data.image_size={args.image_size}", f"train.max_steps={args.steps}", "train.epochs=1000",
           f"data.num_workers={args.workers}"]
    for v in args.variants:
        cmd += ["--variant", v]
    return cmd + lever_families(args.methods, args.variants) + (["--dry-run"] if args.dry_run else [])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.corruptions", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--variants", action="append", default=None, help=f"extra rows (default: {VARIANTS})")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run (GMixout: 30 episodes)")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT / "data" / "fmnist_c")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "fmnist_c")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="print the plan and its estimated time")
    args = ap.parse_args(argv)
    args.variants = list(VARIANTS) if args.variants is None else args.variants
    commit = git_head()  # at the start: the code that trained, even if the tree moves on meanwhile
    if not (args.data / fmnist_c.MANIFEST).is_file():
        fmnist_c.main(["--out", str(args.data)])
    cmd = command(args)
    stem = args.out / f"fmnist_c_{args.backbone}"
    restore_runs(args.work, stem)
    try:
        run_gmixout(cmd)
    finally:  # a stopped comparison publishes what it has (its JSON says which runs), so the next session continues
        if not args.dry_run and (args.work / "compare.json").is_file():
            publish_compare(args.work, stem, {"benchmark": "corruptions", "data": "fmnist_c",
                                              "backbone": args.backbone, "git_commit": commit,
                                              "command": command_line("corruptions", sys.argv[1:])}, cmd)
            print(f"corruptions: wrote {stem}.json, .md, .png, _runs.tgz", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
