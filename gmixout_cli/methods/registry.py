"""Methods by name: each registers its class, its typed config and its presets in one place.

    @register_method("lora", LoRAConfig)
    @register_method("dora", LoRAConfig)
    class PeftLoRA(Method): ...

The registry is the one source of truth for which `method.*` fields a method reads (its config's
fields), which values a name fixes (RandMask is the sparse engine with one episode and lam=0), and
which head a method starts from when `model.head_init=auto` (LP-FT: a linear probe).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from gmixout_cli.config.schema import Config, HeadInit, MethodConfig, ModelConfig

T = TypeVar("T")


@dataclass(frozen=True)
class MethodSpec:
    name: str
    method: type  # built as method(model, cfg, targets, head_prefix, total_steps)
    config: type[MethodConfig]
    presets: Mapping[str, Any] = field(default_factory=dict)  # fields this name fixes
    head_init: HeadInit | None = None  # the head it starts from under model.head_init=auto (None: the model's own)
    summary: str = ""
    tuned: str = "train.lr"  # the learning rate `gmixout compare` searches (the linear probe's is train.head_lr)
    lr_scale: float = 1.0  # where that search starts, relative to the recipe's train.lr

    def fields(self) -> list[str]:
        """The `method.*` fields a user may set for this name (the presets are not among them)."""
        return [f.name for f in dataclasses.fields(self.config) if f.name not in self.presets]


METHODS: dict[str, MethodSpec] = {}


def register_method(name: str, config: type[MethodConfig], presets: Mapping[str, Any] | None = None,
                    head_init: HeadInit | None = None, summary: str = "", tuned: str = "train.lr",
                    lr_scale: float = 1.0) -> Callable[[T], T]:
    """Class decorator: make `name` a `method.name` choice built by the decorated class."""
    def decorate(cls: T) -> T:
        if name in METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        METHODS[name] = MethodSpec(name, cls, config, dict(presets or {}), head_init, summary,  # type: ignore[arg-type]
                                   tuned, lr_scale)
        return cls

    return decorate


def method_spec(name: str) -> MethodSpec:
    """The registered method `name` (KeyError for an unknown one; the config loader reports it first)."""
    _load_builtin_methods()
    return METHODS[name]


def method_names() -> list[str]:
    _load_builtin_methods()
    return sorted(METHODS)


def config_fields(name: str) -> set[str]:
    """Every field of method `name`'s config (common ones and presets included)."""
    return {f.name for f in dataclasses.fields(method_spec(name).config)}


def readers(field_name: str) -> list[str]:
    """The method names whose config has `method.<field_name>`."""
    return sorted(n for n in method_names() if field_name in config_fields(n))


def unread_fields(name: str, fields: list[str]) -> list[str]:
    """Those of `fields` that method `name` never reads."""
    own = config_fields(name)
    return [f for f in fields if f not in own]


def method_model_config(cfg: Config) -> ModelConfig:
    """The model section with the method's own head start applied (`model.head_init=auto` under LP-FT)."""
    head = method_spec(cfg.method.name).head_init
    if head and cfg.model.head_init == "auto":
        return dataclasses.replace(cfg.model, head_init=head)
    return cfg.model


def _load_builtin_methods() -> None:
    import gmixout_cli.methods  # noqa: F401 - importing the package registers every built-in method
