"""AdamW over sparse delta values: one param group per target, stepping through the fused kernel."""

from __future__ import annotations

from typing import Any

import torch

from gmixout_cli.kernels import sparse_adamw_


class SparseAdamW(torch.optim.Optimizer):
    """Each group holds one target: `params` = [delta values], plus `weight` (the dense target) and
    `indices` (sorted int32 flat indices) and `scale` (s), and for a bf16 weight `anchor` (the kept entries'
    fp32 anchor values). The weight is rewritten in place."""

    def __init__(self, groups: list[dict[str, Any]], lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        super().__init__(groups, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        for group in self.param_groups:
            (vals,) = group["params"]
            if vals.grad is None:
                continue
            state = self.state[vals]
            if not state:  # torch's AdamW state format: a float32 CPU step tensor and two moments
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(vals)
                state["exp_avg_sq"] = torch.zeros_like(vals)
            state["step"] += 1
            beta1, beta2 = group["betas"]
            sparse_adamw_(group["weight"].view(-1), group["indices"], vals, vals.grad, state["exp_avg"],
                          state["exp_avg_sq"], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                          weight_decay=group["weight_decay"], step=int(state["step"]), scale=group["scale"],
                          anchor=group.get("anchor"))

    def replace_values(self, group: dict[str, Any], indices: torch.Tensor, reset_moments: bool) -> torch.Tensor:
        """Start a new episode for one group: fresh zero values at `indices`; moments reset, or carried over
        for the indices the old and new masks share (method.reset_moments=false)."""
        (old,) = group["params"]
        old_state = self.state.pop(old, {})
        vals = torch.zeros(indices.numel(), dtype=old.dtype, device=old.device)
        if old_state and not reset_moments:
            old_idx = group["indices"]
            pos = torch.searchsorted(old_idx, indices).clamp_(max=max(old_idx.numel() - 1, 0))
            shared = old_idx[pos] == indices if old_idx.numel() else torch.zeros_like(indices, dtype=torch.bool)
            state = {"step": old_state["step"].clone()}
            for key in ("exp_avg", "exp_avg_sq"):
                state[key] = torch.zeros_like(vals)
                state[key][shared] = old_state[key][pos[shared]]
            self.state[vals] = state
        group["params"] = [vals]
        group["indices"] = indices
        return vals
