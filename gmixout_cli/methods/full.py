"""Full fine-tuning (every parameter trains densely), and LP-FT: the same from a linear-probe head."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.methods.base import Method, adamw, head_param_names, is_bias_or_norm
from gmixout_cli.methods.registry import register_method


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning reads no field of its own (the budget is `train.*`)."""


@register_method("full", FullConfig, summary="every parameter trains densely (AdamW)")
@register_method("lpft", FullConfig, head_init="linear_probe",
                 summary="full fine-tuning from a linear-probe head (LP-FT)")
class FullFinetune(Method):
    """Plain AdamW on all parameters; no weight decay on biases and norms."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        super().__init__(model, cfg, targets, head_prefix, total_steps)
        head = set(head_param_names(model, head_prefix))
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
        for name, param in model.named_parameters():
            param.requires_grad_(True)
            key = "head" if name in head else "no_decay" if is_bias_or_norm(name, param) else "decay"
            groups[key].append(param)
        self._optimizer = adamw([
            {"params": groups["decay"], "lr": self.lr, "weight_decay": self.weight_decay, "name": "backbone"},
            {"params": groups["no_decay"], "lr": self.lr, "weight_decay": 0.0, "name": "bias_norm"},
            {"params": groups["head"], "lr": self.head_lr, "weight_decay": self.weight_decay, "name": "head"},
        ])
        self._trainable = sum(p.numel() for p in model.parameters())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def summary(self) -> dict[str, Any]:
        return {"trainable_entries": self._trainable}
