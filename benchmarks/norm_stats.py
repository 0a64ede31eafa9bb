"""Why full fine-tuning collapsed on small images: BatchNorm statistics from the batches vs the pretrained ones.

    python -m benchmarks.norm_stats          # ~40 min on 2 cores

One `gmixout compare` on the quickstart (EfficientNet-Lite0 from its linear-probe head, 64 px MNIST digits,
UCI optdigits as the shifted domain), rows: full fine-tuning with the pretrained statistics (the default),
and the same with `method.norm_stats=update` (statistics of each batch of 32 small images, the behaviour
before the default changed); 3 seeds, the recipe's budget (GMixout's own quickstart numbers, for reference:
benchmarks/results/quickstart_spread.json). Writes
benchmarks/results/norm_stats_quickstart.{json,md,png} with the commit and the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.bench_common import RESULTS, ROOT, command_line, git_head, publish_compare, run_gmixout


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.norm_stats", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "norm_stats")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    commit = git_head()
    cmd = ["compare", "--data", "builtin:digits/mnist", "--recipe", "quickstart", "--methods", "full",
           "--variant", "full_update_bn:method.name=full method.norm_stats=update", "--seeds", args.seeds,
           "--grid", "full=1e-4,3e-4", "--grid", "full_update_bn=1e-4,3e-4",
           "--max-extensions", "0", "--wise", "", "--out", str(args.work)]
    run_gmixout(cmd)
    stem = args.out / "norm_stats_quickstart"
    publish_compare(args.work, stem, {"benchmark": "norm_stats", "git_commit": commit,
                                      "command": command_line("norm_stats", sys.argv[1:])},
                    cmd)
    print(f"norm_stats: wrote {stem}.json, .md, .png", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
