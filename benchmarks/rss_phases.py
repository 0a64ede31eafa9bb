"""CPU memory phase by phase: where the resident set of a few training steps goes, one method per process.

    python -m benchmarks.rss_phases                  # ViT-B/16 (random weights), batch 2, full and gmixout

A thread samples the RSS every millisecond and keeps the peak of each phase (model build, trainer set-up,
forward, backward, optimizer step) of the product's `Trainer.train_step`, told apart by its `on_phase`
hook; "optimizer" spans the method's gradient hand-over, clipping, the optimizers and the method's step
end. Between steps `malloc_trim` hands freed heap pages back, so the "between steps" figure is what the
method really holds. Explains cpu_rss.py's ratio; writes JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

from benchmarks.bench_common import RESULTS, ROOT, provenance
from gmixout_cli.config import load_config
from gmixout_cli.utils.memory import current_rss_bytes

# the trainer's phase that has just ended -> the phase sampled from then on (the others stay in "optimizer")
NEXT_PHASE = {"forward": "backward", "backward": "optimizer"}


class PhasePeaks:
    """Peak RSS per named phase, sampled by a daemon thread."""

    def __init__(self) -> None:
        self.phase, self.peaks = "start", {"start": current_rss_bytes()}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.is_set():
            rss, phase = current_rss_bytes(), self.phase
            self.peaks[phase] = max(self.peaks.get(phase, 0), rss)
            time.sleep(0.001)

    def enter(self, phase: str) -> None:
        time.sleep(0.005)  # let the sampler see the end of the previous phase
        self.phase = phase
        self.peaks.setdefault(phase, current_rss_bytes())

    def stop(self) -> dict[str, int]:
        time.sleep(0.01)
        self._stop.set()
        self._thread.join()
        return self.peaks


def measure(model: str, method: str, batch: int, steps: int, extra: list[str]) -> dict[str, int]:
    """Run in this process: peaks (bytes) of every phase of `steps` training steps."""
    peaks = PhasePeaks()
    try:
        return _steps(peaks, model, method, batch, steps, extra)
    finally:
        peaks.stop()


def _steps(peaks: PhasePeaks, model: str, method: str, batch: int, steps: int, extra: list[str]) -> dict[str, int]:
    from gmixout_cli.models import build_model
    from gmixout_cli.training import make_trainer

    cfg = load_config(None, ["model.weights=random", f"method.name={method}", f"train.batch_size={batch}",
                             "train.device=cpu", "train.precision=fp32", *extra], {"model.name": model})
    peaks.enter("build")
    built = build_model(dataclasses.replace(cfg.model, head_init="zero"), [f"c{i}" for i in range(1000)], 0)
    peaks.enter("trainer")
    trainer = make_trainer(cfg, built, torch.device("cpu"), total_steps=steps + 10)
    x, y = torch.randn(batch, 3, built.image_size, built.image_size), torch.randint(0, 1000, (batch,))
    trim = ctypes.CDLL("libc.so.6").malloc_trim

    def on_phase(ended: str) -> None:
        if ended == "after_step":  # trainer.step already counts the step that just ended
            trim(0)
            peaks.enter(f"step{trainer.step - 1}.between")
        elif ended in NEXT_PHASE:
            peaks.enter(f"step{trainer.step}.{NEXT_PHASE[ended]}")

    trainer.on_phase = on_phase
    for step in range(steps):
        peaks.enter(f"step{step}.forward")
        trainer.train_step(x, y)
    return peaks.stop()


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.rss_phases", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="vit_b16_clip")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child process: measure one method
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    extra = {"full": [], "gmixout": [f"method.p={args.p}", "method.k=10"]}
    if args.one:
        print(json.dumps(measure(args.model, args.one, args.batch_size, args.steps, extra[args.one])))
        return
    result: dict = {**provenance("rss_phases", torch.device("cpu")),
                    "model": args.model, "batch_size": args.batch_size, "p": args.p}
    for method in extra:  # each in its own process, as cpu_rss.py
        out = subprocess.run([sys.executable, "-m", "benchmarks.rss_phases", "--one", method, "--model", args.model,
                              "--batch-size", str(args.batch_size), "--steps", str(args.steps), "--p", str(args.p)],
                             capture_output=True, text=True, check=True, cwd=ROOT)
        peaks = json.loads(out.stdout.strip().splitlines()[-1])
        last = args.steps - 1  # the steady step: warm allocator, optimizer state in place
        between = peaks[f"step{last - 1}.between"]
        step_peak = max(peaks[f"step{last}.{p}"] for p in ("forward", "backward", "optimizer"))
        result[method] = {"phases_mb": {k: round(v / 2**20) for k, v in peaks.items()},
                          "between_steps_bytes": between, "step_peak_bytes": step_peak,
                          "step_adds_bytes": step_peak - between}
    result["ratio_step_peak"] = result["gmixout"]["step_peak_bytes"] / result["full"]["step_peak_bytes"]
    path = Path(args.out) if args.out else RESULTS / f"rss_phases_{args.model}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    for method in extra:
        r = result[method]
        print(f"{method}: between steps {r['between_steps_bytes'] / 2**30:.2f} GB, step peak "
              f"{r['step_peak_bytes'] / 2**30:.2f} GB (+{r['step_adds_bytes'] / 2**30:.2f})")
    print(f"ratio of step peaks {result['ratio_step_peak']:.2f}; wrote {path}")


if __name__ == "__main__":
    main()
