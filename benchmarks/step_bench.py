"""Training-step time and peak memory of full / LoRA / Mixout / GMixout side by side, in one process.

    # GPU run (the default grid: 2 archs x 2 batches x checkpointing on/off x 5 methods = 40 configs)
    python -m benchmarks.step_bench
    # the same, one arch per process (shorter processes; the second run's file gets a _2 suffix)
    python -m benchmarks.step_bench --archs ViT-B-16
    python -m benchmarks.step_bench --archs ViT-L-14
    # CPU smoke run (a minute or two; fp32, peak RSS instead of CUDA memory)
    python -m benchmarks.step_bench --archs ViT-B-16 --batches 2 --steps 2 --warmup 1 --checkpointing off

Model: open_clip's visual tower with RANDOM weights (`open_clip.create_model(arch).visual`, no
download) plus a 1000-class nn.Linear head on the L2-normalised embedding; inputs are one fixed random
batch on the device (no data loading). bf16 autocast on CUDA, fp32 on CPU.

Methods: `full`, `gmixout` (p, k from --p/--k) and `mixout` (p from --p) are built by the package's
own code (`make_method`) on the four
per-block targets (attn.in_proj_weight, attn.out_proj.weight, mlp.c_fc.weight, mlp.c_proj.weight);
`lora_r8` / `lora_r16` are peft LoRA (alpha = 2r, no dropout) on each block's `attn`
(nn.MultiheadAttention: peft wraps in_proj and out_proj), `mlp.c_fc`, `mlp.c_proj`, plus the dense head,
stepped by a plain AdamW. One step = the package loop's: forward under autocast, cross-entropy,
backward, method.after_backward(), global grad-norm clip 1.0, each optimizer step/zero_grad, the
cosine schedule, method.after_step(step).

Per config: --warmup steps, then --steps timed steps (synchronised, perf_counter): median/mean step
time and images/s; peak memory over warm-up + timed steps (CUDA max_memory_allocated, or CPU peak RSS
after resetting the kernel's mark); then an instrumented pass of --steps steps synchronising between
the phases (forward, backward, after_backward, clip, optimizer, after_step), whose mean shares show the
method's own cost (GMixout's sparse gradient gather runs inside backward, from autograd hooks; its
sparse AdamW step is in `optimizer`; resampling and fold-in, every k steps, in `after_step`). Each
record carries ratios against `full` and `lora_r8` of the same (arch, batch, checkpointing). A config
that runs out of memory is recorded as {"oom": true}; any other failure as {"error": ...}; the run
goes on. The JSON (rewritten after every config, so a cut-off run keeps what it measured) goes to
benchmarks/results/step_bench_<device>_<date>.json (with _2, _3, ... if that exists) unless --out is given.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import fnmatch
import gc
import json
import re
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.bench_common import ROOT, device_name, git_head, next_free, versions
from gmixout_cli.training.schedule import make_scheduler
from gmixout_cli.utils.memory import current_rss_bytes, peak_rss_since_reset, reset_peak_rss

TARGET_PATTERNS = [  # the package's default CLIP targets (gmixout_cli/models/clip.py)
    "visual.transformer.resblocks.*.attn.in_proj_weight",
    "visual.transformer.resblocks.*.attn.out_proj.weight",
    "visual.transformer.resblocks.*.mlp.c_fc.weight",
    "visual.transformer.resblocks.*.mlp.c_proj.weight",
]
LORA_MODULES = r"visual\.transformer\.resblocks\.\d+\.(attn|mlp\.c_fc|mlp\.c_proj)"
LORA_FALLBACK = r"visual\.transformer\.resblocks\.\d+\.(attn\.out_proj|mlp\.c_fc|mlp\.c_proj)"
PHASES = ["forward", "backward", "after_backward", "clip", "optimizer", "after_step"]
NUM_CLASSES = 1000


class Classifier(nn.Module):
    """Visual tower + linear head on the normalised embedding (the package's CLIP classifier shape)."""

    def __init__(self, visual: nn.Module, num_classes: int) -> None:
        super().__init__()
        self.visual = visual
        self.head = nn.Linear(visual.output_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.normalize(self.visual(x), dim=-1))


class PlainAdamW:
    """LoRA's 'method': AdamW over whatever peft left trainable (the adapters and the head)."""

    def __init__(self, model: nn.Module, lr: float, weight_decay: float) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        self.name = "lora"
        self._opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self._trainable = sum(p.numel() for p in params)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._opt]

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def after_backward(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {"trainable_entries": self._trainable}

    def state_bytes(self) -> dict[str, int]:
        return {}


def resolve_targets(model: nn.Module, patterns: list[str]) -> list[str]:
    """Parameter names matching any glob pattern, in model order."""
    return [n for n, _ in model.named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    else:  # hand freed heap back to the OS, or the next config's RSS starts from this one's leftovers
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass


# -- building one config ----------------------------------------------------------------------
def build_package_method(name: str, model: nn.Module, args: argparse.Namespace, total_steps: int) -> tuple[Any, str]:
    """full / gmixout / mixout through the package's own code; returns (method, how it was built)."""
    from gmixout_cli.config import build_config
    from gmixout_cli.methods import make_method

    targets = resolve_targets(model, TARGET_PATTERNS)
    method_cfg: dict[str, Any] = {"name": name}
    if name in ("gmixout", "mixout"):
        method_cfg["p"] = args.p
    if name == "gmixout":
        method_cfg["k"] = args.k
    cfg = build_config({"method": method_cfg, "train": {"lr": args.lr}})
    method = make_method(cfg, model, targets, "head", total_steps)
    if method.name != name:
        raise RuntimeError(f"make_method built {method.name!r} for method.name={name!r}")
    return method, "make_method"


def build_lora(model: nn.Module, rank: int, args: argparse.Namespace) -> tuple[nn.Module, PlainAdamW, dict[str, Any]]:
    """peft LoRA on attn (in_proj + out_proj) and the MLP; falls back to out_proj + MLP if MHA fails."""
    import peft
    from peft.tuners.lora import layer as lora_layer

    info: dict[str, Any] = {"peft": peft.__version__, "r": rank, "alpha": 2 * rank}
    try:
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_MODULES)
        wrapped = peft.get_peft_model(model, config)
        info["target_modules"] = LORA_MODULES
    except Exception as exc:  # noqa: BLE001 - recorded, then the documented fallback
        info["deviation"] = f"peft could not wrap nn.MultiheadAttention ({exc!r}); targets {LORA_FALLBACK}"
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_FALLBACK)
        wrapped = peft.get_peft_model(model, config)
        info["target_modules"] = LORA_FALLBACK
    base = wrapped.get_base_model()
    blocks = base.visual.transformer.resblocks
    info["wrapped"] = {
        "attn_in_proj": sum(isinstance(b.attn, lora_layer.MultiheadAttention) for b in blocks),
        "attn_out_proj": sum(isinstance(getattr(b.attn, "base_layer", b.attn).out_proj, lora_layer.Linear)
                             for b in blocks),
        "mlp_c_fc": sum(isinstance(b.mlp.c_fc, lora_layer.Linear) for b in blocks),
        "mlp_c_proj": sum(isinstance(b.mlp.c_proj, lora_layer.Linear) for b in blocks),
        "blocks": len(blocks),
    }
    for p in base.head.parameters():
        p.requires_grad_(True)
    return wrapped, PlainAdamW(wrapped, args.lr, 0.1), info


def lora_grad_check(model: nn.Module) -> dict[str, bool]:
    """After a backward: do the in_proj and out_proj adapters of block 0 get gradients (B starts at 0)?"""
    attn = model.get_base_model().visual.transformer.resblocks[0].attn
    out: dict[str, bool] = {}
    if hasattr(attn, "lora_B"):
        out["in_proj_lora_B_grad"] = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                         for p in attn.lora_B.parameters())
    out_proj = getattr(attn, "base_layer", attn).out_proj
    if hasattr(out_proj, "lora_B"):
        out["out_proj_lora_B_grad"] = any(p.grad is not None and bool(p.grad.abs().sum() > 0)
                                          for p in out_proj.lora_B.parameters())
    return out


# -- the step ----------------------------------------------------------------------------------
class Stepper:
    """The package loop's step, with an optional phase timer."""

    def __init__(self, model: nn.Module, method: Any, device: torch.device, total_steps: int) -> None:
        self.model, self.method, self.device = model, method, device
        self.optimizers = method.optimizers()
        self.schedulers = [make_scheduler(o, total_steps, 0, "cosine") for o in self.optimizers]
        self.step_no = 0

    def __call__(self, x: torch.Tensor, y: torch.Tensor, phases: dict[str, list[float]] | None = None) -> None:
        mark = _Marker(self.device, phases)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.device.type == "cuda"):
            loss = F.cross_entropy(self.model(x), y)
        mark("forward")
        loss.backward()
        mark("backward")
        self.method.after_backward()
        mark("after_backward")
        params = [p for o in self.optimizers for g in o.param_groups for p in g["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        mark("clip")
        for o in self.optimizers:
            o.step()
            o.zero_grad(set_to_none=True)
        for s in self.schedulers:
            s.step()
        mark("optimizer")
        self.step_no += 1
        self.method.after_step(self.step_no)
        mark("after_step")


class _Marker:
    """Synchronise and record the time since the last mark (only when phases are being timed)."""

    def __init__(self, device: torch.device, phases: dict[str, list[float]] | None) -> None:
        self.device, self.phases = device, phases
        if phases is not None:
            sync(device)
            self.t = time.perf_counter()

    def __call__(self, phase: str) -> None:
        if self.phases is None:
            return
        sync(self.device)
        now = time.perf_counter()
        self.phases.setdefault(phase, []).append(now - self.t)
        self.t = now


# -- one config --------------------------------------------------------------------------------
def run_config(visual_cpu: nn.Module, arch: str, batch: int, method_name: str, ckpt: bool,
               image_size: int, device: torch.device, args: argparse.Namespace) -> dict[str, Any]:
    """Build, warm up, time, instrument; returns the record (memory freed by the caller)."""
    import copy

    record: dict[str, Any] = {"arch": arch, "batch": batch, "method": method_name, "checkpointing": ckpt,
                              "image_size": image_size, "precision": "bf16" if device.type == "cuda" else "fp32"}
    free_memory(device)
    torch.manual_seed(0)
    visual = copy.deepcopy(visual_cpu)
    visual.set_grad_checkpointing(ckpt)
    model: nn.Module = Classifier(visual, NUM_CLASSES).to(device)
    total_steps = args.warmup + 2 * args.steps
    if method_name.startswith("lora_r"):
        model, method, info = build_lora(model, int(method_name.removeprefix("lora_r")), args)
        record["lora"] = info
    else:
        method, built_by = build_package_method(method_name, model, args, total_steps)
        record["built_by"] = built_by
    method.set_train_mode(model)
    record["summary"] = method.summary()
    record["state_bytes"] = method.state_bytes()
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(batch, 3, image_size, image_size, generator=g).to(device)
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=g).to(device)
    stepper = Stepper(model, method, device, total_steps)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        record["memory_at_start_bytes"] = int(torch.cuda.memory_allocated(device))
    else:
        free_memory(device)
        record["peak_rss_reset"] = reset_peak_rss()
        record["memory_at_start_bytes"] = current_rss_bytes()

    if method_name.startswith("lora_r"):  # one extra forward/backward: do the attention adapters learn?
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            F.cross_entropy(model(x), y).backward()
        record["lora"]["grads"] = lora_grad_check(model)
        model.zero_grad(set_to_none=True)
    for _ in range(args.warmup):
        stepper(x, y)
    sync(device)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        stepper(x, y)
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

    phases: dict[str, list[float]] = {}
    for _ in range(args.steps):
        stepper(x, y, phases)
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
    import open_clip

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    now = datetime.datetime.now(datetime.timezone.utc)
    dev = device_name(device)
    slug = re.sub(r"[^a-z0-9]+", "_", dev.split(" (")[0].lower()).strip("_")
    out = args.out or next_free(ROOT / "benchmarks" / "results" / f"step_bench_{slug}_{now:%Y-%m-%d}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "benchmark": "step_bench", "device": dev, "date": now.isoformat(), "git_commit": git_head(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]), **versions(("triton", "open_clip", "peft")),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "records": [],
    }
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
