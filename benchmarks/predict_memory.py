"""The memory predictor (`gmixout profile --predict`) against measured peaks, and its predictions for big models.

    python -m benchmarks.predict_memory validate            # CPU: small configs, fp32 (profiler memory view)
    python -m benchmarks.predict_memory validate --gpu      # a GPU: ViT-B/16 batch 128 bf16 (max_memory_allocated)
    python -m benchmarks.predict_memory predict             # ViT-B/16 b128 and ViT-L/14 b64, bf16, +/- checkpointing
    python -m benchmarks.predict_memory predict --model open_clip:ViT-bigG-14:laion2b_s39b_b160k --batch 32 \
        --out benchmarks/results/memory_predictor_predictions_bigg.json

`validate` runs each config's second training step with random weights on this device and compares its
measured peak with the prediction (ratio = predicted / measured). On a CPU the configs run in fp32: CPU
autocast follows other casting rules than CUDA's, which the predictor models. `predict` writes predictions
only (labelled as such) for GMixout, full fine-tuning and LoRA r=8.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench_common import RESULTS, provenance, versions
from gmixout_cli.config import load_config
from gmixout_cli.profiling.predict import measure, predict

# small enough for two CPU cores, with every method family, micro-batches and activation checkpointing
CPU_CONFIGS = [
    ("timm:vit_tiny_patch16_224", "full", 8, []),
    ("timm:vit_tiny_patch16_224", "gmixout", 8, []),
    ("timm:vit_tiny_patch16_224", "lora", 8, ["train.grad_checkpointing=true"]),
    ("timm:vit_tiny_patch16_224", "mixout", 8, ["train.micro_batch_size=4"]),
    ("timm:resnet18", "full", 16, ["data.image_size=128"]),
    ("timm:efficientnet_lite0", "gmixout", 16, ["data.image_size=128", "method.mask=filter"]),
]
GPU_CONFIGS = [("vit_b16_clip", m, 128, ["train.precision=bf16", *extra])
               for m, extra in (("full", []), ("lora", ["method.r=8"]), ("gmixout", []),
                                ("gmixout", ["method.weight_dtype=bf16"]))]
BIG = [("vit_b16_clip", 128), ("vit_l14_clip", 64)]
METHODS = {"gmixout": [], "gmixout bf16 weights": ["method.weight_dtype=bf16"], "full": [],
           "lora r=8": ["method.r=8"]}


def config(model: str, method: str, batch: int, extra: list[str]) -> Any:
    with warnings.catch_warnings():  # the default recipe's GMixout fields, left out for the other methods
        warnings.simplefilter("ignore")
        return load_config(None, [f"method.name={method.split()[0]}", f"train.batch_size={batch}", *extra],
                           {"model.name": model})


def validate(gpu: bool) -> dict[str, Any]:
    device = torch.device("cuda" if gpu else "cpu")
    rows = []
    for model, method, batch, extra in GPU_CONFIGS if gpu else CPU_CONFIGS:
        cfg = config(model, method, batch, extra if gpu else ["train.precision=fp32", *extra])
        start = time.perf_counter()
        predicted = predict(cfg, 10, 1 << 40)
        measured = measure(cfg, 10, device)
        rows.append({"model": model, "method": method, "batch": batch, "overrides": extra,
                     "precision": cfg.train.precision, "predicted_bytes": predicted["predicted_peak_bytes"],
                     "measured_bytes": measured, "ratio": predicted["predicted_peak_bytes"] / measured,
                     "breakdown": predicted["breakdown"], "seconds": time.perf_counter() - start})
        print(f"{model} {method} b{batch} {' '.join(extra)}: predicted {rows[-1]['predicted_bytes'] / 2**20:.1f} MiB, "
              f"measured {measured / 2**20:.1f} MiB, ratio {rows[-1]['ratio']:.3f}", flush=True)
        if gpu:
            torch.cuda.empty_cache()
    return {"measured_as": "cuda max_memory_allocated" if gpu else "tensors alive at the step's start + the "
            "profiler's highest total of allocations during it", "configs": rows,
            "max_abs_error": max(abs(r["ratio"] - 1) for r in rows)}


def predictions(big: list[tuple[str, int]]) -> dict[str, Any]:
    rows = []
    for model, batch in big:
        for ckpt in (False, True):
            for label, extra in METHODS.items():
                ckpt_key = f"train.grad_checkpointing={str(ckpt).lower()}"
                cfg = config(model, label, batch, ["train.precision=bf16", ckpt_key, *extra])
                p = predict(cfg, 1000, 24 * 2**30)
                rows.append({"model": model, "method": label, "batch": batch, "precision": "bf16",
                             "grad_checkpointing": ckpt, **{k: p[k] for k in (
                                 "breakdown", "predicted_peak_bytes", "context_bytes", "fits",
                                 "bf16_activation_ratio", "peak_at", "autocast_weight_copies_bytes")}})
                print(f"{model} b{batch} ckpt={ckpt} {label}: {p['predicted_peak_bytes'] / 2**30:.2f} GiB "
                      f"(+{p['context_bytes'] / 2**30:.2f} context) {'fits' if p['fits'] else 'does not fit'} 24 GiB",
                      flush=True)
    return {"kind": "predictions (not measurements)", "budget_gib": 24, "classes": 1000, "predictions": rows,
            "outside_anchor": "timm's RTX 3090 (24 GB) AMP training benchmark runs vit_base_patch16_224 at "
                              "batch 192 and vit_large_patch14_224 at batch 48 (full fine-tuning)"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.predict_memory", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("mode", choices=["validate", "predict"])
    ap.add_argument("--gpu", action="store_true", help="validate on CUDA (bf16 ViT-B/16 batch 128)")
    ap.add_argument("--model", default=None, help="predict: this model (any model name) instead of ViT-B/16, ViT-L/14")
    ap.add_argument("--batch", type=int, default=32, help="predict: the batch of --model")
    ap.add_argument("--out", type=Path, default=None, help="output JSON (default: benchmarks/results/...)")
    args = ap.parse_args(argv)
    device = torch.device("cuda" if args.gpu else "cpu")
    big = [(args.model, args.batch)] if args.model else BIG
    body = validate(args.gpu) if args.mode == "validate" else predictions(big)
    name = f"memory_predictor_{'validation_' + device.type if args.mode == 'validate' else 'predictions'}.json"
    out = args.out or RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**provenance("predict_memory", device, argv), "versions": versions(), **body},
                              indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
