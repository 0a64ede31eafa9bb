"""Linear probe: only the classification head trains; the backbone stays exactly pretrained."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gmixout_cli.methods.base import adamw, freeze_norm_stats, head_param_names


class LinearProbe:
    """AdamW on the head alone (BatchNorm statistics frozen too, so the backbone is untouched)."""

    name = "lp"

    def __init__(self, model: nn.Module, head_prefix: str, head_lr: float, weight_decay: float) -> None:
        head = set(head_param_names(model, head_prefix))
        params = []
        for name, param in model.named_parameters():
            param.requires_grad_(name in head)
            if name in head:
                params.append(param)
        self._optimizer = adamw([{"params": params, "lr": head_lr, "weight_decay": weight_decay, "name": "head"}])
        self._trainable = sum(p.numel() for p in params)

    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self._optimizer]

    def set_train_mode(self, model: nn.Module) -> None:
        model.train()
        freeze_norm_stats(model)

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
