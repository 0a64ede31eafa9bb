"""CPU black-box memory check: peak RSS of a few training steps, GMixout vs full fine-tuning, side by side.

    python -m benchmarks.cpu_rss                      # ViT-B/16 (random weights), batch 2, p=0.9
    python -m benchmarks.cpu_rss --model efficientnet_lite0 --batch-size 8

Each method runs `gmixout profile --json` in its own process (so one run's memory cannot leak into the
other's), and the JSON with both reports and their ratio goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks.bench_common import RESULTS, ROOT, provenance


def run_profile(model: str, method: str, batch: int, steps: int, extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "gmixout_cli", "profile", "--json", "--steps", str(steps), "--model", model,
           "model.weights=random", f"method.name={method}", f"train.batch_size={batch}", "train.device=cpu",
           "train.precision=fp32", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, cwd=ROOT)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.cpu_rss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b16_clip")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    full = run_profile(args.model, "full", args.batch_size, args.steps, [])
    ours = run_profile(args.model, "gmixout", args.batch_size, args.steps, [f"method.p={args.p}", "method.k=10"])
    result = {
        **provenance("cpu_rss", torch.device("cpu")),
        "torch": torch.__version__, "model": args.model, "batch_size": args.batch_size, "p": args.p,
        "full": full, "gmixout": ours,
        "ratio_steady_peak_rss": ours["steady_peak_bytes"] / full["steady_peak_bytes"],
        "ratio_process_peak_rss": ours["peak_memory_bytes"] / full["peak_memory_bytes"],
        "ratio_state_bytes": ours["state_total_bytes"] / full["state_total_bytes"],
        # the same peaks less each process's RSS before its model was built (torch + model libraries): the part
        # a method can change; the target is on the raw ratio above
        "ratio_steady_peak_rss_above_baseline": (ours["steady_peak_bytes"] - ours["process_baseline_bytes"])
        / (full["steady_peak_bytes"] - full["process_baseline_bytes"]),
        "target": "ratio_steady_peak_rss <= 0.6",
    }
    out = Path(args.out) if args.out else RESULTS / f"cpu_rss_{args.model}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k.startswith("ratio")}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
