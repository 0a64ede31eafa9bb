"""Fused sparse AdamW: update the delta values and their moments, and write the change into the dense weight.

For the kept entries idx of a target W = A + s*(M * delta):
    delta' = delta*(1 - lr*wd) - lr/bc1 * m / (sqrt(v)/sqrt(bc2) + eps)      (torch.optim.AdamW's update)
    W[idx] += s * (delta' - delta)
so no dense anchor, gradient or moment is ever stored for the target. With bf16 weights (method.weight_dtype)
an increment that small would round away, so the kept entries' fp32 anchor values are passed and the weight is
rewritten from them instead: W[idx] = bf16(anchor + s*delta') (round to nearest, as autocast casts fp32 weights).
"""

from __future__ import annotations

import torch

from gmixout_cli.kernels._dispatch import grid, use_triton

BLOCK = 1024


def sparse_adamw_reference(
    weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, scale: float, anchor: torch.Tensor | None = None,
) -> None:
    """In place on `weight` (flat, dense), `vals`, `exp_avg`, `exp_avg_sq` (all of length nnz but weight)."""
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    old = vals.clone()
    vals.mul_(1.0 - lr * weight_decay)
    exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.sqrt().div_(bc2_sqrt).add_(eps)
    vals.addcdiv_(exp_avg, denom, value=-lr / bc1)
    if anchor is None:
        weight.index_add_(0, idx, (vals - old).mul_(scale))
    else:
        weight.index_put_((idx,), (anchor + scale * vals).to(weight.dtype))


try:
    import triton
    import triton.language as tl

    from gmixout_cli.kernels.sparse_ops import round_nearest_bf16

    @triton.jit
    def _sparse_adamw_kernel(w_ptr, idx_ptr, val_ptr, grad_ptr, m_ptr, v_ptr, anchor_ptr, nnz, lr, beta1, beta2,
                             eps, decay, step_size, bc2_sqrt, scale, BLOCK: tl.constexpr, ANCHORED: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < nnz
        g = tl.load(grad_ptr + offs, mask=mask, other=0.0)
        d = tl.load(val_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
        i = tl.load(idx_ptr + offs, mask=mask, other=0)
        m = m * beta1 + g * (1.0 - beta1)
        v = v * beta2 + g * g * (1.0 - beta2)
        new = d * decay - step_size * m / (tl.sqrt(v) / bc2_sqrt + eps)
        if ANCHORED:  # bf16 weight: rewritten from its fp32 anchor value, rounded to nearest
            a = tl.load(anchor_ptr + offs, mask=mask, other=0.0)
            tl.store(w_ptr + i, round_nearest_bf16(a + new * scale), mask=mask)
        else:
            w = tl.load(w_ptr + i, mask=mask, other=0.0)
            tl.store(w_ptr + i, w + (new - d) * scale, mask=mask)
        tl.store(val_ptr + offs, new, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)

except ImportError:
    pass


def sparse_adamw_(
    weight: torch.Tensor, idx: torch.Tensor, vals: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor, *, lr: float, beta1: float, beta2: float, eps: float, weight_decay: float,
    step: int, scale: float, anchor: torch.Tensor | None = None,
) -> None:
    """The fused step (Triton on CUDA, the reference elsewhere); `weight` is the flat dense target, `anchor` the
    kept entries' fp32 anchor values when the weight is stored in bf16."""
    if not use_triton(vals):
        sparse_adamw_reference(weight, idx, vals, grad, exp_avg, exp_avg_sq, lr=lr, beta1=beta1, beta2=beta2,
                               eps=eps, weight_decay=weight_decay, step=step, scale=scale, anchor=anchor)
        return
    nnz = vals.numel()
    if nnz == 0:
        return
    bc1 = 1.0 - beta1**step
    bc2_sqrt = (1.0 - beta2**step) ** 0.5
    _sparse_adamw_kernel[grid(nnz, BLOCK)](weight, idx, vals, grad, exp_avg, exp_avg_sq,
                                           vals if anchor is None else anchor, nnz, lr, beta1, beta2, eps,
                                           1.0 - lr * weight_decay, lr / bc1, bc2_sqrt, scale, BLOCK=BLOCK,
                                           ANCHORED=anchor is not None)
