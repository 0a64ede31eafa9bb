"""Full fine-tuning: every parameter trains densely (the first baseline)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmixout_cli.methods.base import adamw, head_param_names, is_bias_or_norm


class FullFinetune:
    """Plain AdamW on all parameters; no weight decay on biases and norms."""

    name = "full"

    def __init__(self, model: nn.Module, head_prefix: str, lr: float, head_lr: float, weight_decay: float) -> None:
        self.model = model
        head = set(head_param_names(model, head_prefix))
        groups: dict[str, list[nn.Parameter]] = {"decay": [], "no_decay": [], "head": []}
        for name, param in model.named_parameters():
            param.requires_grad_(True)
            key = "head" if name in head else "no_decay" if is_bias_or_norm(name, param) else "decay"
            groups[key].append(param)
        self._optimizer = adamw([
            {"params": groups["decay"], "lr": lr, "weight_decay": weight_decay, "name": "backbone"},
            {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0, "name": "bias_norm"},
            {"params": groups["head"], "lr": head_lr, "weight_decay": weight_decay, "name": "head"},
        ])
        self._trainable = sum(p.numel() for p in model.parameters())

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()

    def after_backward(self) -> None:
        pass

    def after_step(self, step: int) -> None:
        pass

    def finish(self) -> None:
        pass

    def summary(self) -> dict[str, Any]:
        return {"trainable_entries": self._trainable}

    def state_bytes(self) -> dict[str, int]:
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        pass
