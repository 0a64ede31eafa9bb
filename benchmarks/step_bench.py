"""Training-step time and peak memory of full / LoRA / Mixout / GMixout side by side, in one process.

    # GPU run (the default grid: 2 archs x 2 batches x checkpointing on/off x 5 methods = 40 configs)
    python -m benchmarks.step_bench
    # the same, one arch per process (shorter processes; the second run's file gets a _2 suffix)
    python -m benchmarks.step_bench --archs ViT-B-16
    python -m benchmarks.step_bench --archs ViT-L-14
    # CPU smoke run (a minute or two; fp32, peak RSS instead of CUDA memory)
    python -m benchmarks.step_bench --archs ViT-B-16 --batches 2 --steps 2 --warmup 1 --checkpointing off

Model: open_clip's visual tower with RANDOM weights (`open_clip.create_model(arch).visual`, no
download; --image-size resizes its position embeddings, which the product's model builder cannot) in the
product's `ClipClassifier`, with a randomly initialised 1000-class head; inputs are one fixed random
batch on the device (no data loading). bf16 autocast on CUDA, fp32 on CPU.

Methods: each is built and stepped by the product: `make_trainer` on the ViT's default targets
(`VIT_TARGETS` of gmixout_cli/models/clip.py), with the product's defaults for clipping and schedule.
`full`; `gmixout` (p, k from --p/--k); `gmixout_bf16w`, the same with bf16 target weights
(method.weight_dtype=bf16, bf16 autocast on CPU too); `mixout` (p from --p); `lora_r8` / `lora_r16`, the product's
`lora` method (peft; alpha = 2r, no dropout; peft's lora.MultiheadAttention wraps in_proj and out_proj).
One step is `Trainer.train_step`.

Per config: --warmup steps, then --steps timed steps (synchronised, perf_counter): median/mean step
time and images/s; peak memory over warm-up + timed steps (CUDA max_memory_allocated, or CPU peak RSS
after resetting the kernel's mark); then an instrumented pass of --steps steps, timed phase by phase
through `Trainer.on_phase` (synchronising at each boundary: forward, backward, after_backward, clip,
optimizer, after_step), whose mean shares show the method's own cost (GMixout's sparse gradient gather
runs inside backward, from autograd hooks; its sparse AdamW step is in `optimizer`; resampling and
fold-in, every k steps, in `after_step`). Each record carries ratios against `full` and `lora_r8` of
the same (arch, batch, checkpointing). A config that runs out of memory is recorded as {"oom": true};
any other failure as {"error": ...}; the run goes on. The JSON (rewritten after every config, so a
cut-off run keeps what it measured) goes to benchmarks/results/step_bench_<device>_<date>.json (with
_2, _3, ... if that exists) unless --out is given.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import open_clip
import torch
from torch import nn

from benchmarks.bench_common import RESULTS, next_free, provenance, versions
from gmixout_cli.config import build_config
from gmixout_cli.eval import autocast
from gmixout_cli.models import BuiltModel
from gmixout_cli.models.clip import VIT_TARGETS, ClipClassifier
from gmixout_cli.training import Trainer, make_trainer
from gmixout_cli.utils.memory import (
    current_rss_bytes,
    peak_rss_since_reset,
    release_freed_memory,
    reset_peak_rss,
    resolve_device,
)

NUM_CLASSES = 1000


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    """Hand freed memory back (heap to the OS, or the next config's RSS starts from this one's leftovers)."""
    release_freed_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


class PhaseTimer:
    """`Trainer.on_phase` callback: seconds from the previous boundary to each phase's end, per phase."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.times: dict[str, list[float]] = {}
        self._t = 0.0

    def start(self) -> None:
        """Call before each step: its first phase is timed from here."""
        sync(self.device)
        self._t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        sync(self.device)  # CUDA runs asynchronously: without it the clock sees launches, not work
        now = time.perf_counter()
        self.times.setdefault(phase, []).append(now - self._t)
        self._t = now


# -- building one config ----------------------------------------------------------------------
def method_section(name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The product's `method` config for a benchmark method name (lora_r<rank>: LoRA of that rank)."""
    if name.startswith("lora_r"):
        rank = int(name.removeprefix("lora_r"))
        return {"name": "lora", "r": rank, "alpha": 2 * rank, "lora_dropout": 0.0}
    base = name.removesuffix("_bf16w")
    section: dict[str, Any] = {"name": base}
    if base in ("gmixout", "mixout"):
        section["p"] = args.p
    if base == "gmixout":
        section["k"] = args.k
    if name != base:
        section["weight_dtype"] = "bf16"
    return section


def build_trainer(visual: nn.Module, arch: str, size: int, method_name: str, ckpt: bool, device: torch.device,
                  args: argparse.Namespace, total_steps: int) -> Trainer:
    """The product's trainer for one config around `visual` (moved to `device`)."""
    head = nn.Linear(visual.output_dim, NUM_CLASSES)  # not a zero head: gradients must reach the backbone
    built = BuiltModel(model=ClipClassifier(visual, head).to(device), library="open_clip", arch=arch, family="vit",
                       head=head, head_prefix="head", head_init="random", default_targets=list(VIT_TARGETS),
                       mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD, image_size=size,
                       normalize_features=True)
    cfg = build_config({
        "model": {"name": f"open_clip:{arch}", "weights": "random"},
        "method": method_section(method_name, args),
        "train": {"lr": args.lr, "precision": "bf16" if device.type == "cuda" or method_name.endswith("_bf16w")
                  else "fp32",
                  "grad_checkpointing": ckpt},
    })
    trainer = make_trainer(cfg, built, device, total_steps)
    if trainer.method.name != method_section(method_name, args)["name"]:
        raise RuntimeError(f"make_trainer built {trainer.method.name!r} for {method_name!r}")
    return trainer


def lora_info(model: nn.Module, rank: int) -> dict[str, Any]:
    """What peft wrapped: how many attention (in_proj, out_proj) and MLP layers of how many blocks."""
    import peft
    from peft.tuners.lora import layer as lora_layer

    blocks = model.visual.transformer.resblocks
    return {
        "peft": peft.__version__, "r": rank, "alpha": 2 * rank, "target_modules": list(VIT_TARGETS),
        "wrapped": {
            "attn_in_proj": sum(isinstance(b.attn, lora_layer.MultiheadAttention) for b in blocks),
            "attn_out_proj": sum(isinstance(getattr(b.attn, "base_layer", b.attn).out_proj, lora_layer.Linear)
                                 for b in blocks),
            "mlp_c_fc": sum(isinstance(b.mlp.c_fc, lora_layer.Linear) for b in blocks),
            "mlp_c_proj": sum(isinstance(b.mlp.c_proj, lora_layer.Linear) for b in blocks),
            "blocks": len(blocks),
        },
    }


def lora_grad_check(model: nn.Module) -> dict[str, bool]:
    """After a backward: do the in_proj and out_proj adapters of block 0 get gradients (B starts at 0)?"""
    attn = model.visual.transformer.resblocks[0].attn
    out: dict[str, bool] = {}
    if hasattr(attn, "lora_B"):
        out["in_proj_lora_B_grad"] = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                         for p in attn.lora_B.parameters())
    out_proj = getattr(attn, "base_layer", attn).out_proj
    if hasattr(out_proj, "lora_B"):
        out["out_proj_lora_B_grad"] = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                          for p in out_proj.lora_B.parameters())
    return out


# -- one config --------------------------------------------------------------------------------
def run_config(visual_cpu: nn.Module, arch: str, batch: int, method_name: str, ckpt: bool,
               image_size: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, time, instrument; returns the record (memory freed by the caller)."""
    record: dict[str, Any] = {"arch": arch, "batch": batch, "method": method_name, "checkpointing": ckpt,
                              "image_size": image_size, "precision": "bf16" if device.type == "cuda" else "fp32"}
    free_memory(device)
    torch.manual_seed(0)
    total_steps = args.warmup + 2 * args.steps
    trainer = build_trainer(copy.deepcopy(visual_cpu), arch, image_size, method_name, ckpt, device, args,
                            total_steps)
    model, method = trainer.model, trainer.method
    record["built_by"] = "make_trainer"
    if method_name.startswith("lora_r"):
        record["lora"] = lora_info(model, int(method_name.removeprefix("lora_r")))
    record["summary"] = method.summary()
    record["state_bytes"] = method.state_bytes()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["memory_at_start_bytes"] = int(torch.cuda.memory_allocated(device))
    else:
        free_memory(device)
        record["peak_rss_reset"] = reset_peak_rss()
        record["memory_at_start_bytes"] = current_rss_bytes()

    if method_name.startswith("lora_r"):  # one extra forward/backward: do the attention adapters learn?
        with autocast(device, trainer.precision):
            torch.nn.functional.cross_entropy(model(x), y).backward()
        record["lora"]["grads"] = lora_grad_check(model)
        model.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        trainer.train_step(x, y)
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        trainer.train_step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    if device.type == "cuda":
        record["peak_memory_bytes"] = int(torch.cuda.max_memory_allocated(device))
        record["peak_reserved_bytes"] = int(torch.cuda.max_memory_reserved(device))
        record["peak_kind"] = "cuda_max_memory_allocated"
    else:
        record["peak_memory_bytes"] = peak_rss_since_reset()
        record["peak_kind"] = "cpu_peak_rss"
    med = statistics.median(times)
    record.update({
        "step_s_median": med, "step_s_mean": statistics.fmean(times), "step_s_min": min(times),
        "step_s_max": max(times), "images_per_s": batch / med, "timed_steps": len(times),
    })

    timer = PhaseTimer(device)
    trainer.on_phase = timer
    for _ in range(args.steps):
        timer.start()
        trainer.train_step(x, y)
    trainer.on_phase = None
    phases = timer.times
    total = sum(statistics.fmean(v) for v in phases.values())
    record["phases_mean_s"] = {k: statistics.fmean(v) for k, v in phases.items()}
    record["phases_median_s"] = {k: statistics.median(v) for k, v in phases.items()}
    record["phase_share"] = {k: statistics.fmean(v) / total for k, v in phases.items()}
    # the method's own hooks; GMixout's gradient gather hides in `backward`, its sparse AdamW in `optimizer`
    record["method_hook_share"] = (statistics.fmean(phases["after_backward"])
                                   + statistics.fmean(phases["after_step"])) / total
    record["after_step_share"] = statistics.fmean(phases["after_step"]) / total
    record["instrumented_step_s_mean"] = total
    if not all(torch.isfinite(p).all() for p in model.parameters() if p.requires_grad):
        record["warning"] = "non-finite trainable parameter after the run"
    return record


def add_ratios(records: list[dict[str, Any]]) -> None:
    """Step time, images/s and peak memory of each record over `full` and `lora_r8` of the same setting."""
    ok = {(r["arch"], r["batch"], r["checkpointing"], r["method"]): r for r in records if "step_s_median" in r}
    for r in records:
        if "step_s_median" not in r:
            continue
        for base in ("full", "lora_r8"):
            b = ok.get((r["arch"], r["batch"], r["checkpointing"], base))
            if b is None:
                continue
            r[f"vs_{base}"] = {
                "step_time": r["step_s_median"] / b["step_s_median"],
                "images_per_s": r["images_per_s"] / b["images_per_s"],
                "peak_memory": r["peak_memory_bytes"] / b["peak_memory_bytes"],
            }


# -- the run -----------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.step_bench", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--archs", default="ViT-B-16,ViT-L-14", help="open_clip architectures, comma-separated")
    ap.add_argument("--batches", default="64,128", help="batch sizes, comma-separated")
    ap.add_argument("--methods", default="full,lora_r8,lora_r16,mixout,gmixout",
                    help="full, lora_r<rank>, mixout, gmixout; comma-separated")
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both",
                    help="activation checkpointing of the transformer blocks")
    ap.add_argument("--steps", type=int, default=20, help="timed steps (and instrumented steps) per config")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (optimizer state, autotuning)")
    ap.add_argument("--image-size", type=int, default=None, help="input size; default the model's own")
    ap.add_argument("--p", type=float, default=0.9, help="mask probability of mixout and gmixout")
    ap.add_argument("--k", type=int, default=10, help="gmixout episode length (so timed steps include resampling)")
    ap.add_argument("--lr", type=float, default=1e-5, help="learning rate (irrelevant to timing; kept realistic)")
    ap.add_argument("--device", default="auto", help="auto, cuda or cpu")
    ap.add_argument("--out", type=Path, default=None, help="output JSON; default benchmarks/results/...")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = resolve_device(args.device)
    result: dict[str, Any] = {
        **provenance("step_bench", device, argv), **versions(("triton", "open_clip", "peft")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": [],
    }
    slug = re.sub(r"[^a-z0-9]+", "_", result["device"].split(" (")[0].lower()).strip("_")
    out = args.out or next_free(RESULTS / f"step_bench_{slug}_{result['date'][:10]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    for arch in args.archs.split(","):
        # random weights: nothing is downloaded; --image-size resizes the position embeddings to match
        visual_cpu = open_clip.create_model(arch, force_image_size=args.image_size).visual
        size = args.image_size or int(visual_cpu.image_size[0])
        for batch in (int(b) for b in args.batches.split(",")):
            for ckpt in ckpts:
                for method_name in args.methods.split(","):
                    label = f"{arch} batch {batch} ckpt {'on' if ckpt else 'off'} {method_name}"
                    print(f"[step_bench] {label} ...", flush=True)
                    try:
                        rec = run_config(visual_cpu, arch, batch, method_name, ckpt, size, device, args)
                    except torch.OutOfMemoryError:
                        rec = {"arch": arch, "batch": batch, "method": method_name, "checkpointing": ckpt,
                               "oom": True}
                    except Exception as exc:  # noqa: BLE001 - one broken config must not stop the grid
                        rec = {"arch": arch, "batch": batch, "method": method_name, "checkpointing": ckpt,
                               "error": repr(exc), "traceback": traceback.format_exc(limit=6)}
                    free_memory(device)  # the exception (and its frames) is gone: memory can go back
                    result["records"].append(rec)
                    add_ratios(result["records"])
                    out.write_text(json.dumps(result, indent=2))
                    print(f"[step_bench]   {summary_line(rec)}", flush=True)
        del visual_cpu
        gc.collect()
    print(f"[step_bench] wrote {out}")
    return 0


def summary_line(rec: dict[str, Any]) -> str:
    if rec.get("oom"):
        return "out of memory"
    if "error" in rec:
        return f"error: {rec['error']}"
    line = (f"{rec['step_s_median'] * 1e3:.1f} ms/step, {rec['images_per_s']:.1f} img/s, "
            f"peak {rec['peak_memory_bytes'] / 2**30:.2f} GiB, after_step {rec['after_step_share']:.1%}")
    if "vs_full" in rec:
        line += f", x{rec['vs_full']['step_time']:.2f} time / x{rec['vs_full']['peak_memory']:.2f} mem vs full"
    return line


if __name__ == "__main__":
    sys.exit(main())
