"""Typed configuration: YAML recipes and `key=value` overrides flow one way into `Config`."""

from gmixout_cli.config.load import (
    build_config,
    build_saved_config,
    config_to_dict,
    flatten_dict,
    merge_dicts,
    parse_overrides,
    read_yaml,
)
from gmixout_cli.config.recipes import list_recipes, load_config, resolve_recipe
from gmixout_cli.config.schema import Config, DataConfig, MethodConfig, ModelConfig, TrainConfig

__all__ = [
    "Config", "DataConfig", "MethodConfig", "ModelConfig", "TrainConfig", "build_config", "build_saved_config",
    "config_to_dict", "flatten_dict", "list_recipes", "load_config", "merge_dicts", "parse_overrides", "read_yaml",
    "resolve_recipe",
]
