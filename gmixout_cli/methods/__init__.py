"""Fine-tuning methods behind one small interface (`Method`), registered by name with their configs."""

from __future__ import annotations

from torch import nn

from gmixout_cli.config.schema import Config
from gmixout_cli.methods.base import Method
from gmixout_cli.methods.full import FullFinetune
from gmixout_cli.methods.gmixout import GMixout, GMixoutConfig, episode_length
from gmixout_cli.methods.lora import LoRAConfig, PeftLoRA
from gmixout_cli.methods.mixout import Mixout, MixoutConfig
from gmixout_cli.methods.mlae import MLAE, MLAEConfig
from gmixout_cli.methods.probe import LinearProbe
from gmixout_cli.methods.registry import METHODS, MethodSpec, method_spec, register_method


def make_method(cfg: Config, model: nn.Module, targets: list[str], head_prefix: str, total_steps: int) -> Method:
    """Build the method named by `cfg.method.name` around `model`."""
    return method_spec(cfg.method.name).method(model, cfg, targets, head_prefix, total_steps)


__all__ = [
    "METHODS", "MLAE", "FullFinetune", "GMixout", "GMixoutConfig", "LinearProbe", "LoRAConfig", "MLAEConfig",
    "Method", "MethodSpec", "Mixout", "MixoutConfig", "PeftLoRA", "episode_length", "make_method", "method_spec",
    "register_method",
]
