"""GMixout with dense masks (METHOD.md): episodes of k steps, fresh mask per episode, EMA anchor.

The dense weight W of every target is kept equal to A + s*(M * delta), so forward and backward are
the model's own. After backward the dense weight gradient becomes delta's gradient (s * M * dW); the
optimizer steps delta; W is rewritten. At an episode end the anchor takes the EMA fold-in and delta
and its moments restart.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gmixout_cli.config.schema import MethodConfig
from gmixout_cli.methods.base import freeze_norm_stats, head_param_names, is_bias_or_norm
from gmixout_cli.methods.masks import sample_mask


def episode_length(cfg: MethodConfig, total_steps: int) -> int:
    """k from `method.k`, or from `method.episodes` (default 30) as ceil(total_steps / episodes)."""
    if cfg.k is not None:
        return cfg.k
    episodes = cfg.episodes if cfg.episodes is not None else 30
    return max(1, math.ceil(total_steps / episodes))


@dataclass
class _Target:
    name: str
    index: int
    weight: nn.Parameter  # dense, always A + s*(M * delta)
    anchor: torch.Tensor
    mask: torch.Tensor  # float 0/1, same shape (the sparse engine stores indices instead)
    delta: nn.Parameter


class GMixout:
    """Dense-mask GMixout; the head (and, on request, biases and norms) train densely."""

    name = "gmixout"

    def __init__(
        self,
        model: nn.Module,
        targets: list[str],
        head_prefix: str,
        cfg: MethodConfig,
        total_steps: int,
        seed: int,
        lr: float,
        head_lr: float,
        weight_decay: float,
    ) -> None:
        self.cfg = cfg
        self.seed = seed
        self.total_steps = total_steps
        self.k = episode_length(cfg, total_steps)
        self.s = 1.0 / (1.0 - cfg.p)
        self.episode = 0
        self.steps_in_episode = 0
        head = set(head_param_names(model, head_prefix))
        target_set = set(targets)
        dense_head: list[nn.Parameter] = []
        dense_bias_norm: list[nn.Parameter] = []
        self.targets: list[_Target] = []
        for name, param in model.named_parameters():
            if name in head:
                param.requires_grad_(True)
                dense_head.append(param)
            elif name in target_set:
                param.requires_grad_(True)  # autograd produces the dense gradient, turned into delta's
                self.targets.append(
                    _Target(name, len(self.targets), param, param.detach().clone(), torch.empty(0),
                            nn.Parameter(torch.zeros_like(param)))
                )
            elif cfg.train_bias_norm and is_bias_or_norm(name, param):
                param.requires_grad_(True)
                dense_bias_norm.append(param)
            else:
                param.requires_grad_(False)
        self._groups = [
            {"params": [t.delta for t in self.targets], "lr": lr, "weight_decay": weight_decay, "name": "delta"},
            {"params": dense_bias_norm, "lr": lr, "weight_decay": 0.0, "name": "bias_norm"},
            {"params": dense_head, "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ]
        self._new_masks()

    # -- the Method interface -------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for g in self._groups if g["params"]]

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        if not self.cfg.train_bias_norm:
            freeze_norm_stats(model)

    @torch.no_grad()
    def after_backward(self) -> None:
        for t in self.targets:
            grad = t.weight.grad
            if grad is None:
                continue
            t.delta.grad = grad.mul_(t.mask).mul_(self.s)  # chain rule through W = A + s*(M * delta)
            t.weight.grad = None

    @torch.no_grad()
    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        for t in self.targets:
            torch.addcmul(t.anchor, t.mask, t.delta, value=self.s, out=t.weight.data)
        self.steps_in_episode += 1
        if self.steps_in_episode >= self.k and step < self.total_steps:
            self._fold_in()
            self.episode += 1
            self._new_masks()
            for t in self.targets:
                t.delta.zero_()
                if self.cfg.reset_moments:
                    optimizer.state.pop(t.delta, None)
                t.weight.data.copy_(t.anchor)

    @torch.no_grad()
    def finish(self) -> None:
        if self.steps_in_episode and self.cfg.export == "anchor":
            self._fold_in()
        for t in self.targets:
            if self.cfg.export == "anchor":
                t.weight.data.copy_(t.anchor)
            t.weight.requires_grad_(False)

    def summary(self) -> dict[str, Any]:
        return {
            "k": self.k,
            "episodes": math.ceil(self.total_steps / self.k),
            "s": round(self.s, 4),
            "targets": len(self.targets),
            "target_entries": sum(t.weight.numel() for t in self.targets),
            "trainable_entries_per_episode": int(sum(t.mask.sum().item() for t in self.targets))
            + sum(p.numel() for g in self._groups[1:] for p in g["params"]),
        }

    def state_bytes(self) -> int:
        return sum(x.numel() * x.element_size() for t in self.targets for x in (t.anchor, t.mask, t.delta))

    # -- episodes ---------------------------------------------------------------------------
    def _fold_in(self) -> None:
        """A <- lam*A + (1-lam)*(A + s'*M*delta), s' = s when method.fold_scale (METHOD.md)."""
        scale = (1.0 - self.cfg.lam) * (self.s if self.cfg.fold_scale else 1.0)
        for t in self.targets:
            t.anchor.addcmul_(t.mask, t.delta, value=scale)
        self.steps_in_episode = 0

    def _new_masks(self) -> None:
        for t in self.targets:
            mask = sample_mask(t.weight.shape, self.cfg.p, self.seed, self.episode, t.index, self.cfg.mask == "exact")
            t.mask = mask.to(device=t.weight.device, dtype=t.weight.dtype)
