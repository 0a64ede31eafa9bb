"""Triton kernels of the sparse engine, each beside the PyTorch reference that documents it."""

from gmixout_cli.kernels.masks import keep_mask, mask_seed, philox_reference, sample_filter_indices, sample_indices
from gmixout_cli.kernels.sparse_adamw import sparse_adamw_, sparse_adamw_reference
from gmixout_cli.kernels.sparse_ops import (
    fold_in_,
    fold_in_reference,
    fold_in_rounded_,
    fold_in_rounded_reference,
    gather_add_,
    gather_add_reference,
    stochastic_round_bf16_reference,
)

__all__ = [
    "fold_in_", "fold_in_reference", "fold_in_rounded_", "fold_in_rounded_reference", "gather_add_",
    "gather_add_reference", "keep_mask", "mask_seed",
    "philox_reference", "sample_filter_indices", "sample_indices", "sparse_adamw_", "sparse_adamw_reference",
    "stochastic_round_bf16_reference",
]
