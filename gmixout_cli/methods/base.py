"""The small interface every fine-tuning method implements; the training loop knows only this."""

from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import nn


class Method(Protocol):
    """How parameters are wrapped, what happens after backward, at a step end and at export."""

    name: str

    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups (each with `lr` and `weight_decay`)."""
        ...

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (frozen normalisation layers stay in eval mode)."""
        ...

    def after_backward(self) -> None:
        """Turn the dense gradients autograd produced into the gradients the optimizer sees."""
        ...

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """Called after optimizer step number `step` (1-based)."""
        ...

    def finish(self) -> None:
        """Leave the exported weights in the model's own parameters (merged, dense)."""
        ...

    def summary(self) -> dict[str, Any]:
        """Numbers for the run log: trainable entries, episodes, ..."""
        ...

    def state_bytes(self) -> int:
        """Bytes the method holds beside the model's weights and the optimizer (anchor, masks, deltas)."""
        ...


NORM_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm, nn.SyncBatchNorm)


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases, norm scales/shifts and other 1-D parameters (never weight-decayed, frozen by GMixout)."""
    return param.ndim <= 1 or name.endswith(".bias")


def head_param_names(model: nn.Module, head_prefix: str) -> list[str]:
    """Names of the classification head's parameters."""
    return [n for n, _ in model.named_parameters() if n == head_prefix or n.startswith(head_prefix + ".")]


def freeze_norm_stats(model: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed: their affine parameters are frozen too."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()
