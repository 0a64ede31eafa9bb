"""Sparse gather of a dense gradient, and the episode-end fold-in, each with its PyTorch reference."""

from __future__ import annotations

import torch

from gmixout_cli.kernels._dispatch import grid, use_triton

BLOCK = 1024


def gather_add_reference(grad: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out += scale * grad[idx]  (grad flat dense, idx sorted int32)."""
    out.add_(grad.index_select(0, idx), alpha=scale)


def fold_in_reference(weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, coef: float) -> None:
    """weight[idx] += coef * vals  (weight flat dense; indices are unique)."""
    weight.index_add_(0, idx, vals, alpha=coef)


try:
    import triton
    import triton.language as tl

    @triton.jit
    def _gather_add_kernel(grad_ptr, idx_ptr, out_ptr, nnz, scale, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nnz
        i = tl.load(idx_ptr + offs, mask=mask, other=0)
        g = tl.load(grad_ptr + i, mask=mask, other=0.0)
        o = tl.load(out_ptr + offs, mask=mask, other=0.0)
        tl.store(out_ptr + offs, o + g.to(tl.float32) * scale, mask=mask)

    @triton.jit
    def _fold_in_kernel(w_ptr, idx_ptr, val_ptr, nnz, coef, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nnz
        i = tl.load(idx_ptr + offs, mask=mask, other=0)
        d = tl.load(val_ptr + offs, mask=mask, other=0.0)
        w = tl.load(w_ptr + i, mask=mask, other=0.0)
        tl.store(w_ptr + i, w + d * coef, mask=mask)

except ImportError:
    pass


def gather_add_(grad: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out += scale * grad[idx] (Triton on CUDA, the reference elsewhere)."""
    if not use_triton(out):
        gather_add_reference(grad, idx, out, scale)
    elif out.numel():
        _gather_add_kernel[grid(out.numel(), BLOCK)](grad, idx, out, out.numel(), scale, BLOCK=BLOCK)


def fold_in_(weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, coef: float) -> None:
    """weight[idx] += coef * vals (Triton on CUDA, the reference elsewhere)."""
    if not use_triton(vals):
        fold_in_reference(weight, idx, vals, coef)
    elif vals.numel():
        _fold_in_kernel[grid(vals.numel(), BLOCK)](weight, idx, vals, vals.numel(), coef, BLOCK=BLOCK)
