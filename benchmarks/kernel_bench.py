"""Kernel microbenchmark at the ViT target shapes: sparse AdamW step, gradient gather, mask sampling, fold-in.

    python -m benchmarks.kernel_bench                  # on a GPU: Triton kernels vs PyTorch references vs dense AdamW
    python -m benchmarks.kernel_bench --archs ViT-B-16 --repeats 3   # CPU smoke run (references only)

For every target shape of a ViT block (in_proj, out_proj, c_fc, c_proj) and p, it times each
kernel and its PyTorch reference (index_select / index_add_ based), and a dense fused torch AdamW
step over the whole tensor (what full fine-tuning pays), then sums over the blocks of the model.
Results go to benchmarks/results/kernel_bench_<device>.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.bench_common import RESULTS, provenance
from gmixout_cli.kernels import masks, sparse_adamw, sparse_ops

# (width, mlp width, blocks) of open_clip's visual towers
ARCHS = {"ViT-B-16": (768, 3072, 12), "ViT-L-14": (1024, 4096, 24)}


def shapes(arch: str) -> dict[str, tuple[int, int]]:
    d, h, _ = ARCHS[arch]
    return {"in_proj": (3 * d, d), "out_proj": (d, d), "c_fc": (h, d), "c_proj": (d, h)}


def timeit(fn: Callable[[], None], device: torch.device, repeats: int) -> float:
    """Median seconds of `fn` (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench_shape(shape: tuple[int, int], p: float, device: torch.device, repeats: int, triton_ok: bool) -> dict:
    numel = shape[0] * shape[1]
    weight = torch.randn(numel, device=device)
    idx = masks.sample_indices(numel, p, 1234, device)
    nnz = idx.numel()
    vals, grad = torch.zeros(nnz, device=device), torch.randn(nnz, device=device)
    m, v = torch.zeros(nnz, device=device), torch.zeros(nnz, device=device)
    dense_grad = torch.randn(numel, device=device)
    kw = dict(lr=1e-5, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=3, scale=1 / (1 - p))
    row: dict = {"shape": list(shape), "numel": numel, "nnz": nnz}
    row["adamw_reference_s"] = timeit(lambda: sparse_adamw.sparse_adamw_reference(weight, idx, vals, grad, m, v, **kw),
                                      device, repeats)
    row["gather_reference_s"] = timeit(lambda: sparse_ops.gather_add_reference(dense_grad, idx, vals, 10.0),
                                       device, repeats)
    row["fold_in_reference_s"] = timeit(lambda: sparse_ops.fold_in_reference(weight, idx, vals, -5.0), device, repeats)
    row["mask_reference_s"] = timeit(lambda: torch.nonzero(masks.keep_mask_reference(numel, p, 7, device)),
                                     device, max(1, repeats // 3))
    param = torch.nn.Parameter(weight.clone())
    param.grad = dense_grad.clone()
    dense_opt = torch.optim.AdamW([param], lr=1e-5, fused=device.type == "cuda")
    row["dense_adamw_s"] = timeit(dense_opt.step, device, repeats)
    if triton_ok:
        row["adamw_triton_s"] = timeit(lambda: sparse_adamw.sparse_adamw_(weight, idx, vals, grad, m, v, **kw),
                                       device, repeats)
        row["gather_triton_s"] = timeit(lambda: sparse_ops.gather_add_(dense_grad, idx, vals, 10.0), device, repeats)
        row["fold_in_triton_s"] = timeit(lambda: sparse_ops.fold_in_(weight, idx, vals, -5.0), device, repeats)
        row["mask_triton_s"] = timeit(lambda: masks.sample_indices(numel, p, 7, device), device, repeats)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.kernel_bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="ViT-B-16,ViT-L-14")
    ap.add_argument("--p", default="0.9")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    triton_ok = device.type == "cuda" and os.environ.get("GMIXOUT_KERNELS") != "reference"
    records = []
    for arch in args.archs.split(","):
        blocks = ARCHS[arch][2]
        for p in [float(x) for x in args.p.split(",")]:
            per_shape = {name: bench_shape(s, p, device, args.repeats, triton_ok) for name, s in shapes(arch).items()}
            totals = {key: blocks * sum(r[key] for r in per_shape.values())
                      for key in next(iter(per_shape.values())) if key.endswith("_s")}
            records.append({"arch": arch, "p": p, "blocks": blocks, "per_shape": per_shape, "model_totals_s": totals})
            print(arch, p, {k: f"{v * 1e3:.2f} ms" for k, v in totals.items()})
    result = {
        **provenance("kernel_bench", device),
        "torch": torch.__version__, "triton_kernels_timed": triton_ok,
        "note": "" if triton_ok else "no GPU: PyTorch references and dense AdamW on CPU only; Triton kernels not timed",
        "records": records,
    }
    tag = "cuda" if device.type == "cuda" else "cpu"
    out = Path(args.out) if args.out else RESULTS / f"kernel_bench_{tag}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
