"""GMixout through the sparse engine (docs/METHOD.md, "The sparse engine").

The dense fp32 weight W of every target stays in place equal to A + s*(M * delta); the anchor A is
never stored (A = W - s*delta at the kept entries, W elsewhere). Per episode and target only sorted
int32 indices, the fp32 delta values and their AdamW moments exist. Autograd produces one target's
dense weight gradient at a time; a post-accumulate hook gathers it at the indices (times s) and frees
it at once, also under gradient accumulation. The fused sparse AdamW kernel updates delta and writes
the change into W; at an episode end the fold-in kernel moves W to the new anchor
A + (1-lam)*s'*M*delta, and a fresh mask is drawn on the device.

With `method.weight_dtype=bf16` the dense targets are stored in bf16 (half the weight memory, and no bf16
copies made by autocast). Updates that small would round away, so the kept entries' anchor values are kept
in fp32 (4 bytes per kept entry): each step writes W = bf16(A + s*delta) at the kept entries, which is what
autocast's cast of an fp32 weight computes, and the fold-in rounds the new anchor stochastically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.errors import UserError
from gmixout_cli.kernels import (
    fold_in_,
    fold_in_rounded_,
    gather_add_,
    mask_seed,
    sample_filter_indices,
    sample_indices,
)
from gmixout_cli.methods.base import Method, adamw, check_range, head_param_names, is_bias_or_norm
from gmixout_cli.methods.registry import register_method
from gmixout_cli.methods.sparse_optim import SparseAdamW

DEFAULT_EPISODES = 30
ROUNDING_SALT = 0x2545F4914F6CDD1D  # < 2^63: a fold-in's rounding bits never reuse a mask's random numbers


@dataclass
class GMixoutConfig(MethodConfig):
    """The sparse engine's fields (GMixout, and RandMask: one fixed mask)."""

    p: float = 0.9
    """Mask probability: a fraction 1-p of every target tensor trains per episode."""
    k: int | None = None
    """Episode length in optimizer steps (give k or episodes, not both)."""
    episodes: int | None = None
    """Number of episodes; with neither k nor episodes given, 30."""
    lam: float = 0.5
    """EMA coefficient of the anchor fold-in: A <- lam*A + (1-lam)*(A + s*M*delta)."""
    export: Literal["anchor", "last"] = "anchor"
    """What is exported: the final anchor, or the last episode's weights before the fold-in."""
    fold_scale: bool = True
    """Use s = 1/(1-p) in the anchor fold-in."""
    reset_moments: bool = True
    """Reset the AdamW moments of the delta at each episode."""
    mask: Literal["bernoulli", "exact", "filter"] = "bernoulli"
    """Bernoulli masks per entry, exactly round((1-p)*numel) kept entries per tensor, or whole output filters
    (rows along dim 0: conv filters, linear output units) kept with probability 1-p."""
    train_bias_norm: bool = False
    """Also train biases and normalisation parameters densely (frozen by default)."""
    weight_dtype: Literal["fp32", "bf16"] = "fp32"
    """Storage of the dense target weights (anchor and frozen entries); `bf16` halves their memory and needs
    train.precision=bf16 (the kept entries' anchor and delta stay fp32; the fold-in rounds stochastically)."""

    def problems(self) -> list[str]:
        out: list[str] = []
        check_range(out, "p", self.p, 0.0, 1.0, hint="0.9 trains 10% of each target tensor")
        check_range(out, "lam", self.lam, 0.0, 1.0, closed=True)
        if self.k is not None and self.episodes is not None:
            out.append("'method.k' and 'method.episodes' are both set: give one of them (set the other to null)")
        for key, value in (("k", self.k), ("episodes", self.episodes)):
            if value is not None and value < 1:
                out.append(f"'method.{key}' must be >= 1, got {value}")
        return out


def episode_length(cfg: GMixoutConfig, total_steps: int) -> int:
    """k from `method.k`, or from `method.episodes` (default 30) as ceil(total_steps / episodes)."""
    if cfg.k is not None:
        return cfg.k
    episodes = cfg.episodes if cfg.episodes is not None else DEFAULT_EPISODES
    return max(1, math.ceil(total_steps / episodes))


@dataclass
class _Target:
    name: str
    index: int
    weight: nn.Parameter  # dense, always A + s*(M * delta)
    group: dict[str, Any]  # its SparseAdamW group: params=[delta values], indices, weight, scale
    hook: Any = None


@register_method("gmixout", GMixoutConfig, summary="sparse EMA-anchored Mixout: per episode a fresh 1-p mask")
@register_method("randmask", GMixoutConfig, presets={"episodes": 1, "k": None, "lam": 0.0},
                 summary="one fixed random 1-p mask for the whole run (the sparse engine, one episode)")
class GMixout(Method):
    """Sparse GMixout; the head (and, on request, biases and norms) train densely with AdamW."""

    dense_sync = False  # the target weights' dense gradients never leave the rank: only the gathered deltas do

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        super().__init__(model, cfg, targets, head_prefix, total_steps)
        assert isinstance(cfg.method, GMixoutConfig)
        self.cfg = m = cfg.method
        lr, head_lr, weight_decay = self.lr, self.head_lr, self.weight_decay
        self.k = episode_length(m, total_steps)
        self.bf16 = m.weight_dtype == "bf16"
        if self.bf16 and cfg.train.precision != "bf16":
            raise UserError("method.weight_dtype=bf16 stores the target weights in bf16, which only a bf16 forward "
                            "pass can use: add train.precision=bf16, or set method.weight_dtype=fp32")
        self.s = 1.0 / (1.0 - m.p)
        self.episode = 0
        self.steps_in_episode = 0
        head, target_set = set(head_param_names(model, head_prefix)), set(targets)
        dense_head: list[nn.Parameter] = []
        dense_bias_norm: list[nn.Parameter] = []
        target_params: list[tuple[str, nn.Parameter]] = []
        for name, param in model.named_parameters():
            if name in head:
                dense_head.append(param)
            elif name in target_set:
                if self.bf16:
                    param.data = param.data.to(torch.bfloat16)
                target_params.append((name, param))
            elif m.train_bias_norm and is_bias_or_norm(name, param):
                dense_bias_norm.append(param)
            else:
                param.requires_grad_(False)
                continue
            param.requires_grad_(True)  # targets too: autograd makes their dense gradient, one layer at a time
        self.dense = adamw([
            {"params": dense_bias_norm, "lr": lr, "weight_decay": 0.0, "name": "bias_norm"},
            {"params": dense_head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ]) if dense_head or dense_bias_norm else None
        groups = []
        for index, (name, param) in enumerate(target_params):
            idx = self._sample(param, index)
            vals = torch.zeros(idx.numel(), dtype=torch.float32, device=param.device)
            groups.append({"params": [vals], "indices": idx, "weight": param.data, "scale": self.s, "name": name,
                           "anchor": self._anchor(param, idx)})
        self.sparse = SparseAdamW(groups, lr=lr, weight_decay=weight_decay) if groups else None
        self.targets = [_Target(name, i, param, group) for i, ((name, param), group)
                        in enumerate(zip(target_params, self.sparse.param_groups if self.sparse else [], strict=True))]
        for t in self.targets:
            t.hook = t.weight.register_post_accumulate_grad_hook(self._gather_hook(t))

    def _gather_hook(self, t: _Target):  # noqa: ANN202
        def hook(param: torch.Tensor) -> None:
            (vals,) = t.group["params"]
            if vals.grad is None:
                vals.grad = torch.zeros_like(vals)
            # d loss / d delta = s * dW at the kept entries; accumulates across micro-batches
            assert param.grad is not None  # a post-accumulate hook runs once the gradient exists
            gather_add_(param.grad.view(-1), t.group["indices"], vals.grad, self.s)
            param.grad = None  # the dense gradient of this target is freed before the next layer's exists

        return hook

    @property
    def _sparse(self) -> SparseAdamW:
        """The sparse optimizer; it exists whenever there is a target to step."""
        assert self.sparse is not None
        return self.sparse

    def _anchor(self, weight: torch.Tensor, idx: torch.Tensor) -> torch.Tensor | None:
        """bf16 weights: the fp32 anchor values at the kept entries (exact: W equals the anchor at an episode's
        start); fp32 weights need none."""
        return weight.detach().view(-1)[idx].float() if self.bf16 else None

    def _sample(self, weight: torch.Tensor, index: int) -> torch.Tensor:
        seed = mask_seed(self.seed, self.episode, index)
        if self.cfg.mask == "filter":
            return sample_filter_indices(weight.shape, self.cfg.p, seed, weight.device)
        return sample_indices(weight.numel(), self.cfg.p, seed, weight.device, self.cfg.mask == "exact")

    # -- the Method interface -------------------------------------------------------------
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [o for o in (self.sparse, self.dense) if o is not None]

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        self.steps_in_episode += 1
        if self.steps_in_episode >= self.k and step < self.total_steps:
            self._fold_in()
            self.episode += 1
            for t in self.targets:
                idx = self._sample(t.weight, t.index)
                self._sparse.replace_values(t.group, idx, self.cfg.reset_moments)
                t.group["anchor"] = self._anchor(t.weight, idx)

    @torch.no_grad()
    def finish(self) -> None:
        if self.steps_in_episode and self.cfg.export == "anchor":
            self._fold_in()  # W becomes the final anchor
        for t in self.targets:  # export "last": W already is A + s*M*delta
            t.hook.remove()
            t.weight.requires_grad_(False)
            t.weight.grad = None

    def summary(self) -> dict[str, Any]:
        dense = self.dense.param_groups if self.dense else []
        return {
            "k": self.k, "episodes": math.ceil(self.total_steps / self.k), "s": round(self.s, 4),
            "targets": len(self.targets), "target_entries": sum(t.weight.numel() for t in self.targets),
            "trainable_entries_per_episode": sum(t.group["indices"].numel() for t in self.targets)
            + sum(p.numel() for g in dense for p in g["params"]),
        }

    def state_bytes(self) -> dict[str, int]:
        nnz = sum(t.group["indices"].numel() for t in self.targets)
        out = {"sparse_values": 4 * nnz, "sparse_indices": 4 * nnz}
        return out | ({"sparse_anchor": 4 * nnz} if self.bf16 else {})

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors = {}
        for t in self.targets:
            tensors[f"{t.name}.indices"] = t.group["indices"]
            tensors[f"{t.name}.values"] = t.group["params"][0]
            if self.bf16:
                tensors[f"{t.name}.anchor"] = t.group["anchor"]
        return tensors, {"episode": self.episode, "steps_in_episode": self.steps_in_episode}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        self.episode, self.steps_in_episode = int(values["episode"]), int(values["steps_in_episode"])
        for t in self.targets:
            indices, vals = tensors[f"{t.name}.indices"], tensors[f"{t.name}.values"]
            anchor = tensors[f"{t.name}.anchor"] if self.bf16 else None
            _check_sparse_state(t.name, indices, vals, t.weight, anchor)
            self._sparse.state.pop(t.group["params"][0], None)
            t.group["indices"] = indices.to(t.weight.device)
            t.group["params"] = [vals.to(t.weight.device)]
            t.group["anchor"] = None if anchor is None else anchor.to(t.weight.device)

    # -- episodes ---------------------------------------------------------------------------
    def _fold_in(self) -> None:
        """A_new = A + (1-lam)*s'*M*delta; with W = A + s*M*delta that is W += ((1-lam)*s' - s)*M*delta."""
        step = (1.0 - self.cfg.lam) * (self.s if self.cfg.fold_scale else 1.0)
        for t in self.targets:
            (vals,) = t.group["params"]
            if self.bf16:  # from the fp32 anchor, rounded stochastically (its own seed stream, apart from masks')
                fold_in_rounded_(t.weight.data.view(-1), t.group["indices"], t.group["anchor"], vals, step,
                                 mask_seed(self.seed, self.episode, t.index) ^ ROUNDING_SALT)
            else:
                fold_in_(t.weight.data.view(-1), t.group["indices"], vals, step - self.s)
        self.steps_in_episode = 0


def _check_sparse_state(name: str, indices: torch.Tensor, vals: torch.Tensor, weight: torch.Tensor,
                        anchor: torch.Tensor | None) -> None:
    """A checkpoint's episode state must fit its target: the kernels index the weight with it unchecked."""
    ok = (indices.dtype == torch.int32 and indices.ndim == 1 and vals.shape == indices.shape
          and vals.dtype == torch.float32
          and (anchor is None or (anchor.shape == indices.shape and anchor.dtype == torch.float32)))
    if ok and indices.numel():
        ok = (int(indices[0]) >= 0 and int(indices[-1]) < weight.numel()
              and bool((indices[1:] > indices[:-1]).all()))
    if not ok:
        raise ValueError(f"the sparse state of {name} does not fit that weight")
