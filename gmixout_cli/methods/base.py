"""The small interface every fine-tuning method implements; the training loop knows only this."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.errors import UserError


class Method:
    """How parameters are wrapped, which optimizers step them, what happens at a step end and at export.

    Every method is built the same way, `Method(model, cfg, targets, head_prefix, total_steps)`: its own fields
    come from `cfg.method` (the config it registered with), the budget from `cfg.train`. The defaults here
    are no-ops; a method overrides what it needs.
    """

    updates_norm_stats = False
    """Whether BatchNorm running statistics follow the training batches (`method.norm_stats=auto`). No built-in
    method does: statistics of small batches of small images are noisy, differ from the pretrained ones the
    starting head was fit on, and made full fine-tuning end below its own start (`method.norm_stats=update`)."""

    dense_sync = True
    """On several processes, whether DDP synchronises the gradients of every trainable parameter; False: the
    trainer all-reduces only the gradients its optimizers step (GMixout's sparse delta values and head)."""

    def __init__(self, model: nn.Module, cfg: Config, targets: list[str], head_prefix: str, total_steps: int) -> None:
        t = cfg.train
        self.model, self.name, self.total_steps, self.seed = model, cfg.method.name, total_steps, t.seed
        self.lr, self.head_lr, self.weight_decay = t.lr, t.lr if t.head_lr is None else t.head_lr, t.weight_decay
        self.default_targets = cfg.model.targets is None  # the model's own set: some may be left out, and said

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """The optimizers that step this method's trainable state (each gets the global lr schedule)."""
        raise NotImplementedError

    def set_train_mode(self, model: nn.Module) -> None:
        """Put the model in training mode (BatchNorm statistics frozen unless the method updates them)."""
        model.train()
        if not self.updates_norm_stats:
            freeze_norm_stats(model)

    def after_backward(self) -> None:
        """Turn the gradients autograd produced into the gradients the optimizers see."""

    def after_step(self, step: int) -> None:
        """Called after optimizer step number `step` (1-based)."""

    def finish(self) -> None:
        """Leave the exported weights in the model's own parameters (merged, dense)."""

    def summary(self) -> dict[str, Any]:
        """Numbers for the run log: trainable entries, episodes, ..."""
        return {}

    def state_bytes(self) -> dict[str, int]:
        """Bytes the method holds beside the model's weights, by kind (e.g. sparse values, indices)."""
        return {}

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """What a checkpoint needs beyond the model's weights and the optimizers: (tensors, JSON-able values)."""
        return {}, {}

    def load_state_dict(self, tensors: dict[str, torch.Tensor], values: dict[str, Any]) -> None:
        """Restore `state_dict()`'s output into a freshly built method (before its optimizers are restored)."""


@dataclass
class RankConfig(MethodConfig):
    """The fields of low-rank adapter methods (LoRA, DoRA, MLAE)."""

    r: int = 8
    """Rank of the adapters (MLAE: the number of rank-1 experts)."""
    alpha: float | None = None
    """Scale numerator (scale = alpha / r); null = the method's default (LoRA, DoRA: 2r; MLAE: r)."""

    alpha_per_rank: ClassVar[float] = 1.0

    @property
    def scale_alpha(self) -> float:
        return float(self.alpha_per_rank * self.r if self.alpha is None else self.alpha)

    def problems(self) -> list[str]:
        return [f"'method.r' must be >= 1, got {self.r}"] if self.r < 1 else []


def check_range(problems: list[str], key: str, value: float, low: float, high: float, closed: bool = False,
                hint: str = "") -> None:
    """Append a message when `low <= value < high` (`closed`: `<= high`) does not hold."""
    ok = low <= value <= high if closed else low <= value < high
    if not ok:
        interval = f"[{low:g}, {high:g}{']' if closed else ')'}"
        problems.append(f"'method.{key}' must be in {interval}, got {value}{f' ({hint})' if hint else ''}")


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases, norm scales/shifts and other 1-D parameters (never weight-decayed, frozen by GMixout)."""
    return param.ndim <= 1 or name.endswith(".bias")


def head_param_names(model: nn.Module, head_prefix: str) -> list[str]:
    """Names of the classification head's parameters."""
    return [n for n, _ in model.named_parameters() if n == head_prefix or n.startswith(head_prefix + ".")]


def freeze_norm_stats(model: nn.Module) -> None:
    """Keep BatchNorm running statistics fixed (eval mode); affine parameters train where the method trains them."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.eval()


def set_norm_stats(model: nn.Module, mode: str, model_name: str) -> None:
    """Override the method's BatchNorm mode (`method.norm_stats`): `update` follows the batches, `frozen` keeps
    the pretrained statistics; `auto` leaves the method's choice."""
    if mode == "auto":
        return
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:  # the key would do nothing: say so rather than ignore it
        raise UserError(f"method.norm_stats={mode} has no effect: {model_name} has no BatchNorm layers; "
                        "remove the key (or set method.norm_stats=auto)")
    for module in norms:
        module.train(mode == "update")


def adamw(groups: list[dict[str, Any]]) -> torch.optim.AdamW:
    """AdamW over the non-empty groups (torch's default foreach implementation)."""
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.999), eps=1e-8)


def param_orders(model: nn.Module) -> dict[str, list[str]]:
    """Each module's parameter names in registration order (state_dict order)."""
    return {name: list(module._parameters) for name, module in model.named_modules()}


def restore_param_orders(model: nn.Module, orders: dict[str, list[str]]) -> None:
    """Parameters re-registered by parametrize or peft land last; put them back in the library's order so the
    exported state_dict matches the library's key for key."""
    for name, module in model.named_modules():
        for key in orders.get(name, []):
            if key in module._parameters:
                module._parameters[key] = module._parameters.pop(key)


def drop_grouped_convs(model: nn.Module, targets: list[str]) -> tuple[list[str], int]:
    """`targets` without the weights of grouped (e.g. depthwise) convolutions, and how many were dropped."""
    def grouped(target: str) -> bool:
        owner, _, leaf = target.rpartition(".")
        module = model.get_submodule(owner) if owner else model
        return leaf == "weight" and isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)) and module.groups > 1

    kept = [t for t in targets if not grouped(t)]
    return kept, len(targets) - len(kept)
