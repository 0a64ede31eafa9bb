"""Backbones and classifiers: build from the registry, pick GMixout targets, export and reload."""

from gmixout_cli.models.common import BuiltModel
from gmixout_cli.models.export import load_classifier, read_metadata, save_classifier
from gmixout_cli.models.registry import auto_head, build_model, list_models, resolve_targets

__all__ = [
    "BuiltModel",
    "auto_head",
    "build_model",
    "list_models",
    "load_classifier",
    "read_metadata",
    "resolve_targets",
    "save_classifier",
]
