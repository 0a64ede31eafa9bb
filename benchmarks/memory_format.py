"""Training-step and evaluation time of convnets with contiguous against channels_last image batches.

    python -m benchmarks.memory_format                     # Lite0 and MobileNetV2, full / LoRA / GMixout, 96 px
    python -m benchmarks.memory_format --image-size 224 --batch 16

`model.memory_format=auto` (the default) feeds convolutional networks channels_last batches; this measures
what that buys, side by side in one process. Per (model, method): the product builds the model (packaged
pretrained weights) and its trainer from the model's GMixout recipe with `method.name` set, once per
layout; one fixed batch of real-sized random images; --warmup untimed steps each, then --rounds rounds
that time --steps steps of each layout in turn (alternating, so drift in the machine's speed hits both),
median step time per layout; the same for no-grad forward passes (evaluation). Each record carries the
speed-up contiguous / channels_last and the largest logit difference of the two layouts' first forward pass
(float rounding only). JSON to benchmarks/results/memory_format_<device>_<date>.json unless --out is given.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_common import RESULTS, next_free, provenance, versions
from gmixout_cli.config import load_config
from gmixout_cli.models import build_model
from gmixout_cli.training import Trainer, make_trainer
from gmixout_cli.utils.io import write_json
from gmixout_cli.utils.memory import resolve_device

LAYOUTS = ("contiguous", "channels_last")


def build(model: str, method: str, layout: str, size: int, device: torch.device) -> Trainer:
    """The product's trainer for one (model, method, layout), from the model's GMixout recipe."""
    cfg = load_config(f"gmixout_{model}", [f"method.name={method}", f"model.memory_format={layout}",
                                            f"data.image_size={size}", "model.head_init=zero"])
    built = build_model(cfg.model, [f"class{i}" for i in range(7)], seed=0)
    with torch.no_grad():  # a zero head sends no gradient into the backbone; the same head for both layouts
        built.head.weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(0))
    built.model.to(device)
    return make_trainer(cfg, built, device, total_steps=1_000_000)


def first_logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Eval-mode logits, leaving every module's training flag as it was (the method set BatchNorm's)."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    with torch.no_grad():
        out = model(x).float()
    for m, flag in flags.items():
        m.training = flag
    return out


def timed(fn, steps: int, device: torch.device) -> float:
    """Seconds per call of `fn`, over `steps` calls."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / steps


def measure(model: str, method: str, args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    """Median train-step and eval-forward seconds per layout, and their ratios."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size, generator=gen).to(device)
    y = torch.randint(0, 7, (args.batch,), generator=gen).to(device)
    trainers = {lay: build(model, method, lay, args.image_size, device) for lay in LAYOUTS}
    # the layouts' forward passes before training (afterwards they also differ by their dropout draws)
    logits = {lay: first_logits(t.model, x) for lay, t in trainers.items()}
    diff = (logits["contiguous"] - logits["channels_last"]).abs().max().item()
    for t in trainers.values():
        for _ in range(args.warmup):
            t.train_step(x, y)
    step: dict[str, list[float]] = {lay: [] for lay in LAYOUTS}
    for _ in range(args.rounds):
        for lay, t in trainers.items():
            step[lay].append(timed(lambda t=t: t.train_step(x, y), args.steps, device))
    for t in trainers.values():
        t.model.eval()
    fwd: dict[str, list[float]] = {lay: [] for lay in LAYOUTS}
    with torch.no_grad():
        for _ in range(args.rounds):
            for lay, t in trainers.items():
                fwd[lay].append(timed(lambda t=t: t.model(x), args.steps, device))
    med = {f"{kind}_s": {lay: statistics.median(v[lay]) for lay in LAYOUTS} for kind, v in (("step", step),
                                                                                               ("eval", fwd))}
    return {"model": model, "method": method, "batch": args.batch, "image_size": args.image_size, **med,
            "step_speedup": med["step_s"]["contiguous"] / med["step_s"]["channels_last"],
            "eval_speedup": med["eval_s"]["contiguous"] / med["eval_s"]["channels_last"],
            "max_logit_diff": diff}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.memory_format", description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="efficientnet_lite0,mobilenet_v2")
    ap.add_argument("--methods", default="full,lora,gmixout")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per layout per round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    result: dict[str, Any] = {**provenance("memory_format", device, argv), "versions": versions(("timm",)),
                              "records": []}
    date = datetime.date.today().isoformat()
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = args.out or next_free(RESULTS / f"memory_format_{tag}_{date}.json")
    for model in args.models.split(","):
        for method in args.methods.split(","):
            rec = measure(model, method, args, device)
            result["records"].append(rec)
            write_json(out, result)  # after every record, so a cut-off run keeps what it measured
            print(f"{model} {method}: step {rec['step_s']['contiguous']:.3f} -> {rec['step_s']['channels_last']:.3f}"
                  f" s ({rec['step_speedup']:.2f}x), eval {rec['eval_speedup']:.2f}x, "
                  f"logits differ by {rec['max_logit_diff']:.1e}", flush=True)
    print(json.dumps({"out": str(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
