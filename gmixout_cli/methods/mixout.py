"""Mixout (Lee et al., ICLR 2020; github bloodwass/mixout), dense: the memory baseline GMixout beats.

Every target weight keeps its dense fine-tuned value θ (the module's own parameter, stepped by AdamW
like full fine-tuning) and a frozen copy u of its pretrained value. Each training forward draws a
fresh Bernoulli mask M (an entry keeps θ with probability 1-p) and uses, in the original code's form,

    W = (M*θ + (1-M)*u - p*u) / (1-p)        (E[W] = θ; at p = 0, W = θ exactly)

In eval mode, and in the exported weights, W = θ. The substitution is a `torch.nn.utils.parametrize`
parametrization on the module that owns the weight, so the model's forward code is untouched and it
works for Linear weights, open_clip's `attn.in_proj_weight` and conv kernels alike.

Masks are reproducible and safe under activation checkpointing: a forward pre-hook on the model counts
training forwards, and each target reseeds its own torch.Generator from (seed, forward count, target
index) whenever the weight is read, so a block recomputed in backward sees the same mask as its forward.
nn.MultiheadAttention reads `in_proj_weight` three times per forward (two fast-path checks, then the
call): a one-entry cache returns the same W to consecutive reads of one target, and holds at most one
extra weight, dropped when the forward returns. (Several training forwards before one backward under
checkpointing would recompute with the last forward's masks; the training loop never does that.)

Everything trains densely, as in full fine-tuning: the head (under its own lr), biases and norms
(no weight decay) and every non-target weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.methods.base import (
    Method,
    adamw,
    check_range,
    head_param_names,
    is_bias_or_norm,
    param_orders,
    restore_param_orders,
)
from gmixout_cli.methods.registry import register_method

_SEED_STRIDE = 1_000_003  # keeps (seed, draw, target) keys apart for any realistic number of targets/draws


class _MixoutFn(torch.autograd.Function):
    """W = (where(M, θ, u) - p*u) / (1-p); dW/dθ = M / (1-p). Saves the bool mask (1 byte an entry)."""

    @staticmethod
    def forward(ctx: Any, theta: torch.Tensor, u: torch.Tensor, mask: torch.Tensor, p: float) -> torch.Tensor:
        ctx.save_for_backward(mask)
        ctx.p = p
        return torch.where(mask, theta, u).sub_(u, alpha=p).div_(1.0 - p)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        (mask,) = ctx.saved_tensors
        zero = torch.zeros((), dtype=grad.dtype, device=grad.device)
        return torch.where(mask, grad, zero).div_(1.0 - ctx.p), None, None, None


class _Shared:
    """State shared by every target of one Mixout: training forwards so far, the one-entry W cache."""

    def __init__(self) -> None:
        self.draw = 0
        self.slot: tuple[tuple[int, int, bool], torch.Tensor] | None = None


class MixoutParametrization(nn.Module):
    """The parametrization θ -> W of one target weight; the identity in eval mode."""

    u: torch.Tensor  # the frozen pretrained value (a buffer)

    def __init__(self, pretrained: torch.Tensor, p: float, seed: int, index: int, shared: _Shared) -> None:
        super().__init__()
        # Non-persistent: the state dict stays the model's own once the parametrization is removed.
        self.register_buffer("u", pretrained.detach().clone(), persistent=False)
        self.p = p
        self.seed = seed
        self.index = index
        self.shared = shared
        self._gen: torch.Generator | None = None

    def mask(self) -> torch.Tensor:
        """The keep mask (True = θ) of the current training forward; the same on every read within it."""
        if self.u.is_meta:  # a memory prediction: the mask's shape and size, no values
            return torch.empty(self.u.shape, dtype=torch.bool, device=self.u.device)
        if self._gen is None or self._gen.device != self.u.device:
            self._gen = torch.Generator(device=self.u.device)
        key = (self.seed * _SEED_STRIDE + self.shared.draw) * _SEED_STRIDE + self.index
        self._gen.manual_seed(key % (2**63))
        # rand < 1-p rather than bernoulli_: the same law, half the time on CPU
        return torch.rand(self.u.shape, device=self.u.device, generator=self._gen) < (1.0 - self.p)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return theta
        key = (self.index, self.shared.draw, torch.is_grad_enabled())
        if self.shared.slot is not None and self.shared.slot[0] == key:
            return self.shared.slot[1]
        weight = _MixoutFn.apply(theta, self.u, self.mask(), self.p)
        self.shared.slot = (key, weight)
        return weight


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """The module that owns parameter `name`, and the attribute name there."""
    module_name, _, attr = name.rpartition(".")
    return (model.get_submodule(module_name) if module_name else model), attr


@dataclass
class MixoutConfig(MethodConfig):
    """The original Mixout's one field."""

    p: float = 0.9
    """Probability that an entry is mixed back to its pretrained value at a forward."""

    def problems(self) -> list[str]:
        out: list[str] = []
        check_range(out, "p", self.p, 0.0, 1.0)
        return out


@register_method("mixout", MixoutConfig, summary="the original dense Mixout: a fresh mask every forward")
class Mixout(Method):
    """Dense Mixout on the target weights; everything else trains densely as in full fine-tuning."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        super().__init__(model, cfg, targets, head_prefix, total_steps)
        assert isinstance(cfg.method, MixoutConfig)
        self.p = p = cfg.method.p
        seed, lr, head_lr, weight_decay = self.seed, self.lr, self.head_lr, self.weight_decay
        self.shared = _Shared()
        head = set(head_param_names(model, head_prefix))
        target_set = set(targets)
        params = dict(model.named_parameters())
        missing = sorted(target_set - set(params))
        if missing:
            raise ValueError(f"mixout targets not among the model's parameters: {', '.join(missing[:5])}")
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
        self.targets: list[str] = []
        for name, param in params.items():
            param.requires_grad_(True)
            if name in head:
                groups["head"].append(param)
            elif name in target_set:
                groups["decay"].append(param)
                self.targets.append(name)
            else:
                groups["decay" if not is_bias_or_norm(name, param) else "no_decay"].append(param)
        self._params: list[tuple[nn.Module, str, MixoutParametrization]] = []
        self._orders = param_orders(model)
        for index, name in enumerate(self.targets):
            module, attr = _owner(model, name)
            param_module = MixoutParametrization(params[name], p, seed, index, self.shared)
            # unsafe: skips the registration-time consistency call (it would draw a mask for nothing);
            # shape and dtype are preserved by construction.
            parametrize.register_parametrization(module, attr, param_module, unsafe=True)
            self._params.append((module, attr, param_module))
        self._hooks = [model.register_forward_pre_hook(self._next_draw), model.register_forward_hook(self._drop_cache)]
        self._optimizer = adamw([
            {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "name": "bias_norm"},
            {"params": groups["head"], "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ])
        self._trainable = sum(p_.numel() for p_ in params.values())
        self._target_entries = sum(params[n].numel() for n in self.targets)
        self._u_bytes = sum(pm.u.numel() * pm.u.element_size() for _, _, pm in self._params)

    def _next_draw(self, module: nn.Module, args: Any) -> None:
        if module.training:
            self.shared.draw += 1

    def _drop_cache(self, module: nn.Module, args: Any, output: Any) -> None:
        self.shared.slot = None  # the graph keeps what backward needs; the fp32 W can go

    # -- the Method interface -------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def after_backward(self) -> None:
        self.shared.slot = None  # a W cached by a checkpointed block's recompute

    def finish(self) -> None:
        """Drop the parametrizations: every target is its plain parameter again, holding θ."""
        for hook in self._hooks:
            hook.remove()
        self.shared.slot = None
        for module, attr, _ in self._params:
            if parametrize.is_parametrized(module, attr):
                parametrize.remove_parametrizations(module, attr, leave_parametrized=False)
        restore_param_orders(self.model, self._orders)  # removal re-registers theta last
        self._params = []

    def summary(self) -> dict[str, Any]:
        return {
            "p": self.p,
            "targets": len(self.targets),
            "target_entries": self._target_entries,
            "trainable_entries": self._trainable,
        }

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {"draw": self.shared.draw}  # masks are reseeded from the draw count

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.shared.draw = values["draw"]

    def state_bytes(self) -> dict[str, int]:
        return {"pretrained_copy": self._u_bytes}
