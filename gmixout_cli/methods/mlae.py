"""MLAE, Masked LoRA Experts (Wang et al.; github jie040109/MLAE; docs/METHOD.md).

Each target weight W0 [out, in] gets a rank-r LoRA split into r rank-1 experts b_i a_i, each with a
learnable coefficient c_i initialised to 1:

    W = W0 + (alpha/r) * B diag(c ⊙ m) A        (A: Kaiming-uniform as in LoRA, B: zero)

During training m is expert-level dropout on the coefficient vector: one Bernoulli(1-p) draw per expert per
training forward pass (shared by the whole batch), survivors scaled by 1/(1-p). In eval mode m = 1. The
substitution is a `torch.nn.utils.parametrize` parametrization on the module that owns the weight (like
mixout.py), so module forwards are untouched; it covers Linear weights, nn.MultiheadAttention's
`in_proj_weight` and its `out_proj.weight`, and ungrouped conv kernels [out, in, kh, kw], whose update is
the rank-r matrix reshaped from [out, in*kh*kw] (the factorisation peft's conv LoRA uses). Grouped
(depthwise) convs are refused when named, and left out (counted in the summary) of the model's default targets.

The mask is drawn once per training forward of the whole model (a forward pre-hook counts forwards) and
reused by every read of the weight within it: MultiheadAttention reads `in_proj_weight` several times per
forward, and a block recomputed under activation checkpointing sees the same experts as its forward.

`finish()` evaluates W in eval mode (no dropout), writes it into the original parameter and removes the
parametrization, so the state dict has exactly the library's keys with merged values.

alpha defaults to r (scale 1), a keyword beyond the paper's r and p.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from gmixout_cli.config.schema import Config
from gmixout_cli.errors import UserError
from gmixout_cli.methods.base import (
    Method,
    RankConfig,
    adamw,
    check_range,
    drop_grouped_convs,
    head_param_names,
    param_orders,
    restore_param_orders,
)
from gmixout_cli.methods.registry import register_method


class _Shared:
    """Training forwards of the whole model so far (the mask key)."""

    def __init__(self) -> None:
        self.draw = 0


class MLAEParametrization(nn.Module):
    """W0 -> W0 + scale * B diag(c ⊙ m) A; m = 1 in eval mode."""

    def __init__(self, weight: torch.Tensor, r: int, p: float, scale: float, shared: _Shared) -> None:
        super().__init__()
        out_features, in_features = weight.shape[0], weight[0].numel()
        self.shape = weight.shape
        dtype, device = weight.dtype, weight.device
        self.A = nn.Parameter(torch.empty(r, in_features, dtype=dtype, device=device))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))  # LoRA's (and peft's) init of lora_A
        self.B = nn.Parameter(torch.zeros(out_features, r, dtype=dtype, device=device))
        self.c = nn.Parameter(torch.ones(r, dtype=dtype, device=device))
        self.p = p
        self.scale = scale
        self.shared = shared
        self._mask_key = -1
        self._mask: torch.Tensor | None = None

    def mask(self) -> torch.Tensor:
        """The scaled expert mask of the current training forward (kept/(1-p) or 0), the same on every read."""
        if self._mask is None or self._mask_key != self.shared.draw:
            keep = torch.rand(self.c.shape, device=self.c.device) >= self.p
            self._mask = keep.to(self.c.dtype) / (1.0 - self.p)
            self._mask_key = self.shared.draw
        return self._mask

    def coefficients(self) -> torch.Tensor:
        if self.training and self.p > 0:
            return self.c * self.mask()
        return self.c

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight + ((self.B * self.coefficients()) @ self.A * self.scale).view(self.shape)


@dataclass
class MLAEConfig(RankConfig):
    """Masked LoRA experts: rank, scale (alpha = r by default) and expert dropout."""

    p: float = 0.5
    """Expert dropout on the coefficients during training."""

    def problems(self) -> list[str]:
        out = super().problems()
        check_range(out, "p", self.p, 0.0, 1.0)
        return out


@register_method("mlae", MLAEConfig, summary="masked LoRA experts (rank-1 experts under dropout), merged at export",
                 lr_scale=3.0)
class MLAE(Method):
    """Masked LoRA experts on the target weights; the head trains densely; everything else frozen."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        super().__init__(model, cfg, targets, head_prefix, total_steps)
        assert isinstance(cfg.method, MLAEConfig)
        r, p = cfg.method.r, cfg.method.p
        self.r, self.p, self.alpha = r, p, cfg.method.scale_alpha
        lr, head_lr, weight_decay = self.lr, self.head_lr, self.weight_decay
        self.shared = _Shared()
        head = set(head_param_names(model, head_prefix))
        params = dict(model.named_parameters())
        missing = sorted(set(targets) - set(params))
        if missing:
            raise UserError(f"mlae targets not among the model's parameters: {', '.join(missing[:5])}; "
                            "fix model.targets")
        self.targets = list(dict.fromkeys(targets))
        self.skipped_grouped = 0
        if self.default_targets:  # the model's default set: depthwise convs have no low-rank form here, say so
            self.targets, self.skipped_grouped = drop_grouped_convs(model, self.targets)
        for name in self.targets:
            module, attr = _owner(model, name)
            if name in head:
                raise UserError(f"mlae target {name} is in the head ({head_prefix}), which trains densely; "
                                "drop it from model.targets")
            linear_like = (isinstance(module, nn.Linear) and attr == "weight") or (
                isinstance(module, nn.MultiheadAttention) and attr == "in_proj_weight")
            conv = isinstance(module, nn.Conv2d) and attr == "weight" and module.groups == 1
            if not (linear_like and params[name].ndim == 2) and not conv:
                raise UserError(
                    f"mlae cannot adapt target {name} ({type(module).__name__}.{attr}): only Linear weights, "
                    "nn.MultiheadAttention in_proj_weight and ungrouped Conv2d kernels are supported; "
                    "drop it from model.targets")
        for param in params.values():
            param.requires_grad_(False)
        self._orders = param_orders(model)
        self._params: list[tuple[nn.Module, str, MLAEParametrization]] = []
        for name in self.targets:
            module, attr = _owner(model, name)
            pm = MLAEParametrization(params[name], r, p, self.alpha / r, self.shared)
            # unsafe: skips the registration-time consistency call; shape and dtype are preserved by construction
            parametrize.register_parametrization(module, attr, pm, unsafe=True)
            self._params.append((module, attr, pm))
        head_params = [params[n] for n in sorted(head)]
        for param in head_params:
            param.requires_grad_(True)
        ab = [t for _, _, pm in self._params for t in (pm.A, pm.B)]
        coef = [pm.c for _, _, pm in self._params]
        self._optimizer = adamw([
            {"params": ab, "lr": lr, "weight_decay": weight_decay, "name": "adapters"},
            {"params": coef, "lr": lr, "weight_decay": 0.0, "name": "coefficients"},
            {"params": head_params, "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ])
        self._adapter_entries = sum(t.numel() for t in ab + coef)
        self._adapter_bytes = sum(t.numel() * t.element_size() for t in ab + coef)
        self._head_entries = sum(t.numel() for t in head_params)
        self._hook: RemovableHandle | None = model.register_forward_pre_hook(self._next_draw)

    def _next_draw(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.shared.draw += 1

    # -- the Method interface -------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def finish(self) -> None:
        """Merge W0 + scale * B diag(c) A into each target and drop the parametrizations."""
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        with torch.no_grad():
            for module, attr, pm in self._params:
                if not parametrize.is_parametrized(module, attr):
                    continue
                pm.eval()  # no expert dropout in the exported weight
                parametrize.remove_parametrizations(module, attr, leave_parametrized=True)
        restore_param_orders(self.model, self._orders)  # removal re-registers the weight last
        self._params = []

    def summary(self) -> dict[str, Any]:
        return {
            "r": self.r,
            "p": self.p,
            "targets": len(self.targets),
            **({"grouped_convs_left_out": self.skipped_grouped} if self.skipped_grouped else {}),
            "adapter_entries": self._adapter_entries,
            "trainable_entries": self._adapter_entries + self._head_entries,
        }

    def state_bytes(self) -> dict[str, int]:
        return {"adapters": self._adapter_bytes}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        for name, (_, _, pm) in zip(self.targets, self._params, strict=True):
            for key in ("A", "B", "c"):
                tensors[f"{name}.{key}"] = getattr(pm, key).detach().clone()
        return tensors, {"draw": self.shared.draw}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        with torch.no_grad():
            for name, (_, _, pm) in zip(self.targets, self._params, strict=True):
                for key in ("A", "B", "c"):
                    getattr(pm, key).copy_(tensors[f"{name}.{key}"])
        self.shared.draw = int(values.get("draw", 0))


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that owns parameter `name`, and the attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr
