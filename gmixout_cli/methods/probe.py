"""Linear probe: only the classification head trains; the backbone stays exactly pretrained."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.methods.base import Method, adamw, head_param_names
from gmixout_cli.methods.registry import register_method


@dataclass
class LinearProbeConfig(MethodConfig):
    """The linear probe reads no field of its own (its learning rate is `train.head_lr`)."""


@register_method("lp", LinearProbeConfig, summary="the head only (linear probe)", tuned="train.head_lr")
class LinearProbe(Method):
    """AdamW on the head alone (BatchNorm statistics frozen too, so the backbone is untouched)."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        super().__init__(model, cfg, targets, head_prefix, total_steps)
        head = set(head_param_names(model, head_prefix))
        params = []
        for name, param in model.named_parameters():
            param.requires_grad_(name in head)
            if name in head:
                params.append(param)
        self._optimizer = adamw([{"params": params, "lr": self.head_lr, "weight_decay": self.weight_decay,
                                  "name": "head"}])
        self._trainable = sum(p.numel() for p in params)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def summary(self) -> dict[str, Any]:
        return {"trainable_entries": self._trainable}
