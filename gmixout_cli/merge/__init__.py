"""Post-hoc merges of fine-tuned weights."""

from gmixout_cli.merge.initial import initial_state
from gmixout_cli.merge.wise import check_compatible, interpolate, load_weights, save_merged

__all__ = ["check_compatible", "initial_state", "interpolate", "load_weights", "save_merged"]
