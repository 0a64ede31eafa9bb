"""Exploration: gather GMixout's sparse weight gradient inside the matmul that produces it.

Today a target's weight gradient dW = G^T X ([out, in], G: [T, out] output gradient, X: [T, in]
input, T tokens) is made densely by autograd (cuBLAS), then `gather_add_` reads it at the episode's
sorted flat indices and it is freed. Here one Triton kernel computes each [BM, BN] tile of G^T X and,
in its epilogue, adds s * tile at the kept entries straight into the compact gradient of the delta
values: the dense dW never exists. The kept entries of a tile are recomputed from the mask's Philox
seed (the same `tl.randint` stream as `kernels/masks.py`), and their positions in the compact array
are `start[row, column block]` (from the sorted indices, once per episode) plus an exclusive cumsum
along the tile's row. Only Bernoulli masks (not `method.mask=exact`) have that seed.

The engine keeps the dense-then-gather path unless this benchmark shows the fused kernel pays:

    python -m benchmarks.epilogue_gather                 # a GPU: times cuBLAS dW (+ gather) vs fused
    TRITON_INTERPRET=1 python -m benchmarks.epilogue_gather --check-only   # CPU: correctness only

Results go to benchmarks/results/epilogue_gather_<device>.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.bench_common import RESULTS, provenance
from benchmarks.kernel_bench import ARCHS, shapes, timeit
from gmixout_cli.kernels import gather_add_, sample_indices
from gmixout_cli.kernels.masks import keep_threshold

CONFIGS = [(128, 128, 32, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 4), (64, 64, 64, 4, 3)]  # BM BN BK warps stages


def block_starts(idx: torch.Tensor, rows: int, cols: int, bn: int) -> torch.Tensor:
    """int32 [rows, ceil(cols/bn)]: how many kept entries precede (row, column block) in flat order."""
    n_cb = (cols + bn - 1) // bn
    r = torch.arange(rows, device=idx.device, dtype=torch.int64)[:, None]
    c = torch.arange(n_cb, device=idx.device, dtype=torch.int64)[None, :] * bn
    return torch.searchsorted(idx.to(torch.int64), (r * cols + c).reshape(-1)).to(torch.int32).view(rows, n_cb)


def wgrad_gather_reference(g: torch.Tensor, x: torch.Tensor, idx: torch.Tensor, vals_grad: torch.Tensor,
                           scale: float) -> None:
    """vals_grad += scale * (G^T X)[idx] in fp32: what autograd + `gather_add_` compute."""
    dw = g.float().t() @ x.float()
    vals_grad.add_(dw.reshape(-1)[idx.long()], alpha=scale)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _wgrad_gather_kernel(g_ptr, x_ptr, start_ptr, vg_ptr, T, OUT, IN, n_cb, stride_gt, stride_xt, seed,
                             threshold, scale, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        pid_m, pid_n = tl.program_id(0), tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        cols = pid_n * BN + tl.arange(0, BN)
        ks = tl.arange(0, BK)
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, T, BK):
            kk = k0 + ks
            a = tl.load(g_ptr + kk[None, :] * stride_gt + rows[:, None],  # G^T tile [BM, BK]
                        mask=(rows[:, None] < OUT) & (kk[None, :] < T), other=0.0)
            b = tl.load(x_ptr + kk[:, None] * stride_xt + cols[None, :],  # X tile [BK, BN]
                        mask=(kk[:, None] < T) & (cols[None, :] < IN), other=0.0)
            acc += tl.dot(a, b)
        # epilogue: the tile's kept entries, from the mask's own Philox stream (int32 counters, as masks.py)
        inside = (rows[:, None] < OUT) & (cols[None, :] < IN)
        offs = rows[:, None] * IN + cols[None, :]
        keep = ((tl.randint(seed, offs).to(tl.int64) < threshold) & inside).to(tl.int32)
        before = tl.cumsum(keep, axis=1) - keep  # kept entries left of this one in the tile's row
        start = tl.load(start_ptr + rows * n_cb + pid_n, mask=rows < OUT, other=0)
        pos = start[:, None] + before
        hit = keep != 0
        old = tl.load(vg_ptr + pos, mask=hit, other=0.0)
        tl.store(vg_ptr + pos, old + scale * acc, mask=hit)

except ImportError:
    pass


def wgrad_gather_(g: torch.Tensor, x: torch.Tensor, starts: torch.Tensor, vals_grad: torch.Tensor, scale: float,
                  seed: int, p: float, config: tuple[int, int, int, int, int] = CONFIGS[0]) -> None:
    """vals_grad += scale * (G^T X)[kept entries of the Bernoulli mask (seed, p)], no dense dW.

    `starts` = block_starts(indices, OUT, IN, BN) for this config's BN."""
    bm, bn, bk, warps, stages = config
    (t, out), inn = g.shape, x.shape[1]
    assert x.shape[0] == t and g.stride(1) == 1 and x.stride(1) == 1 and starts.shape[1] == (inn + bn - 1) // bn
    grid = ((out + bm - 1) // bm, (inn + bn - 1) // bn)
    _wgrad_gather_kernel[grid](g, x, starts, vals_grad, t, out, inn, starts.shape[1], g.stride(0), x.stride(0), seed,
                               keep_threshold(p), scale, BM=bm, BN=bn, BK=bk, num_warps=warps, num_stages=stages)


def check(device: torch.device, dtype: torch.dtype, tokens: int, out: int, inn: int, p: float,
          config: tuple[int, int, int, int, int]) -> float:
    """Max abs difference between the fused kernel and the reference on random data (also accumulating)."""
    gen = torch.Generator().manual_seed(0)
    g = torch.randn(tokens, out, generator=gen).to(device, dtype)
    x = torch.randn(tokens, inn, generator=gen).to(device, dtype)
    seed = 12345
    idx = sample_indices(out * inn, p, seed, device)
    ref = torch.randn(idx.numel(), generator=gen).to(device)
    got = ref.clone()
    starts = block_starts(idx, out, inn, config[1])
    for _ in range(2):  # two micro-batches accumulate
        wgrad_gather_reference(g, x, idx, ref, 10.0)
        wgrad_gather_(g, x, starts, got, 10.0, seed, p, config)
    return (got - ref).abs().max().item() / max(ref.abs().max().item(), 1e-12)


def bench(arch: str, batch: int, p: float, repeats: int, device: torch.device) -> list[dict]:
    tokens = batch * 197 if arch == "ViT-B-16" else batch * 257  # 224 px: 14x14 or 16x16 patches + class token
    rows = []
    for name, (out, inn) in shapes(arch).items():
        g = torch.randn(tokens, out, device=device, dtype=torch.bfloat16)
        x = torch.randn(tokens, inn, device=device, dtype=torch.bfloat16)
        seed = 777
        idx = sample_indices(out * inn, p, seed, device)
        vg = torch.zeros(idx.numel(), device=device)

        # the timed closures run within this iteration: default arguments pin its tensors all the same
        def dense_then_gather(g=g, x=x, idx=idx, vg=vg) -> None:  # bf16 dW, fp32 .grad, then the gather
            gather_add_(torch.mm(g.t(), x).float().view(-1), idx, vg, 10.0)

        row = {"target": name, "shape": [out, inn], "tokens": tokens, "nnz": idx.numel(),
               "dense_dw_bytes_avoided": out * inn * (2 + 4),
               "mm_only_s": timeit(lambda g=g, x=x: torch.mm(g.t(), x), device, repeats),
               "dense_then_gather_s": timeit(dense_then_gather, device, repeats), "fused": {}}
        for cfg in CONFIGS:
            starts = block_starts(idx, out, inn, cfg[1])
            def fused(g=g, x=x, starts=starts, vg=vg, cfg=cfg, seed=seed) -> None:
                wgrad_gather_(g, x, starts, vg, 10.0, seed, p, cfg)

            row["fused"]["x".join(map(str, cfg))] = timeit(fused, device, repeats)
        row["fused_best_s"] = min(row["fused"].values())
        row["fused_over_dense_then_gather"] = row["fused_best_s"] / row["dense_then_gather_s"]
        rows.append(row)
        print(arch, batch, name, f"dense+gather {row['dense_then_gather_s'] * 1e3:.3f} ms, "
              f"fused {row['fused_best_s'] * 1e3:.3f} ms ({row['fused_over_dense_then_gather']:.2f}x)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.epilogue_gather", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="ViT-B-16,ViT-L-14")
    ap.add_argument("--batches", default="64,128")
    ap.add_argument("--p", type=float, default=0.9)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--check-only", action="store_true", help="correctness against the reference, no timing")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    small = (24, 40, 56, (16, 16, 16, 1, 1))  # tokens, out, in, config: every edge masked
    checks = {"fp32_small": check(device, torch.float32, *small[:3], args.p, small[3])}
    if device.type == "cuda":
        checks["bf16_vit_b_c_fc"] = check(device, torch.bfloat16, 512, 3072, 768, args.p, CONFIGS[0])
    print("relative max error vs reference:", checks)
    if args.check_only:
        return
    if device.type != "cuda":
        raise SystemExit("epilogue_gather: timing needs a GPU (use --check-only on CPU)")
    records = [{"arch": a, "batch": b, "targets": bench(a, b, args.p, args.repeats, device)}
               for a in args.archs.split(",") for b in (int(v) for v in args.batches.split(","))]
    for r in records:
        blocks = ARCHS[r["arch"]][2]
        r["model_totals_s"] = {k: blocks * sum(t[k] for t in r["targets"])
                               for k in ("mm_only_s", "dense_then_gather_s", "fused_best_s")}
    result = {
        **provenance("epilogue_gather", device),
        "torch": torch.__version__, "triton": triton.__version__, "p": args.p, "checks": checks, "records": records,
        "verdict_rule": "adopt in the engine only if fused_best_s < dense_then_gather_s at ViT-B/16 batch 128",
    }
    out = Path(args.out) if args.out else RESULTS / "epilogue_gather_cuda.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
