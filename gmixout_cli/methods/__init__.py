"""Fine-tuning methods behind one small interface (`Method`)."""

from __future__ import annotations

from torch import nn

from gmixout_cli.config.schema import Config
from gmixout_cli.methods.base import Method
from gmixout_cli.methods.full import FullFinetune
from gmixout_cli.methods.gmixout import GMixout, episode_length
from gmixout_cli.methods.lora import PeftLoRA
from gmixout_cli.methods.mixout import Mixout
from gmixout_cli.methods.mlae import MLAE
from gmixout_cli.methods.probe import LinearProbe


def make_method(cfg: Config, model: nn.Module, targets: list[str], head_prefix: str, total_steps: int) -> Method:
    """Build the method named by `cfg.method.name` around `model`."""
    t = cfg.train
    head_lr = t.head_lr if t.head_lr is not None else t.lr
    if cfg.method.name in ("full", "lpft"):  # LP-FT differs in its head initialisation only (model.head_init)
        return FullFinetune(model, head_prefix, t.lr, head_lr, t.weight_decay)
    m = cfg.method
    if m.name in ("lora", "dora"):
        alpha = m.alpha if m.alpha is not None else 2.0 * m.r
        return PeftLoRA(model, targets, head_prefix, m.r, alpha, m.lora_dropout, m.name == "dora", t.lr, head_lr,
                        t.weight_decay, default_targets=cfg.model.targets is None)
    if m.name == "mlae":
        return MLAE(model, targets, head_prefix, m.r, m.p, t.lr, head_lr, t.weight_decay, alpha=m.alpha,
                    default_targets=cfg.model.targets is None)
    if cfg.method.name == "lp":
        return LinearProbe(model, head_prefix, head_lr, t.weight_decay)
    if cfg.method.name == "mixout":
        return Mixout(model, targets, head_prefix, cfg.method.p, t.seed, t.lr, head_lr, t.weight_decay)
    # gmixout, and randmask (the config checks it is GMixout with one episode and lam = 0)
    return GMixout(model, targets, head_prefix, cfg.method, total_steps, t.seed, t.lr, head_lr, t.weight_decay)


__all__ = [
    "MLAE", "FullFinetune", "GMixout", "LinearProbe", "Method", "Mixout", "PeftLoRA", "episode_length", "make_method",
]
