"""Sparse gather of a dense gradient, and the episode-end fold-in, each with its PyTorch reference.

With bf16 weights the fold-in writes the new anchor A + c*delta, computed in fp32 from the kept entries' fp32
anchor values, rounded stochastically to bf16: rounding to nearest would drop every increment below half a
bf16 step (2^-9 of the weight) at every episode, a bias that stochastic rounding removes (E[round(x)] = x).
The 16 random bits of entry i are Philox(seed, i), as for the masks, so a fold-in is reproducible.
"""

from __future__ import annotations

import torch

from gmixout_cli.kernels._dispatch import grid, use_triton
from gmixout_cli.kernels.masks import philox_reference

BLOCK = 1024


def gather_add_reference(grad: torch.Tensor, idx: torch.Tensor, out: torch.Tensor, scale: float) -> None:
    """out += scale * grad[idx]  (grad flat dense, idx sorted int32)."""
    out.add_(grad.index_select(0, idx), alpha=scale)


def fold_in_reference(weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, coef: float) -> None:
    """weight[idx] += coef * vals  (weight flat dense; indices are unique)."""
    weight.index_add_(0, idx, vals, alpha=coef)


def stochastic_round_bf16_reference(x: torch.Tensor, idx: torch.Tensor, seed: int) -> torch.Tensor:
    """bf16(x) rounded up in magnitude with probability (dropped low bits) / 2^16, from Philox(seed, idx)."""
    bits = x.float().view(torch.int32).to(torch.int64).bitwise_and_(0xFFFFFFFF)
    bits.add_(philox_reference(seed, idx).bitwise_and_(0xFFFF)).bitwise_and_(0xFFFF0000)
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)  # the uint32 pattern as int32
    return bits.view(torch.float32).to(torch.bfloat16)  # exact: the low 16 bits are zero


def fold_in_rounded_reference(weight: torch.Tensor, idx: torch.Tensor, anchor: torch.Tensor, vals: torch.Tensor,
                              coef: float, seed: int) -> None:
    """weight[idx] = stochastic_round_bf16(anchor + coef * vals)  (weight flat dense bf16)."""
    weight.index_put_((idx,), stochastic_round_bf16_reference(anchor + coef * vals, idx, seed))


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

    @triton.jit
    def _bf16_bits(x, r):
        """x (fp32) as bf16 after adding r to its low 16 bits: r = 0x7FFF + lsb rounds to nearest even, 16 random
        bits round stochastically. In bits, because the interpreter's float casts truncate."""
        bits = ((x.to(tl.uint32, bitcast=True) + r) & 0xFFFF0000).to(tl.float32, bitcast=True)
        return bits.to(tl.bfloat16)  # exact: the low 16 bits are zero

    @triton.jit
    def round_nearest_bf16(x):
        """fp32 -> bf16, round to nearest even (as torch's `.to(torch.bfloat16)`; finite values)."""
        return _bf16_bits(x, 0x7FFF + ((x.to(tl.uint32, bitcast=True) >> 16) & 1))

    @triton.jit
    def _fold_in_rounded_kernel(w_ptr, idx_ptr, anchor_ptr, val_ptr, nnz, coef, seed, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nnz
        i = tl.load(idx_ptr + offs, mask=mask, other=0)
        d = tl.load(val_ptr + offs, mask=mask, other=0.0)
        a = tl.load(anchor_ptr + offs, mask=mask, other=0.0)
        tl.store(w_ptr + i, _bf16_bits(a + d * coef, tl.randint(seed, i) & 0xFFFF), mask=mask)

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


def fold_in_rounded_(weight: torch.Tensor, idx: torch.Tensor, anchor: torch.Tensor, vals: torch.Tensor, coef: float,
                     seed: int) -> None:
    """weight[idx] = stochastic_round_bf16(anchor + coef * vals) (Triton on CUDA, the reference elsewhere)."""
    if not use_triton(vals):
        fold_in_rounded_reference(weight, idx, anchor, vals, coef, seed)
    elif vals.numel():
        _fold_in_rounded_kernel[grid(vals.numel(), BLOCK)](weight, idx, anchor, vals, vals.numel(), coef, seed,
                                                           BLOCK=BLOCK)
