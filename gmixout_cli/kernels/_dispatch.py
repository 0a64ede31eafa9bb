"""Kernel choice: Triton on CUDA tensors, the PyTorch reference elsewhere (override with GMIXOUT_KERNELS)."""

from __future__ import annotations

import functools
import os

import torch


@functools.cache
def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:  # a broken triton install must not break CPU training
        return False
    return True


def use_triton(t: torch.Tensor) -> bool:
    """`GMIXOUT_KERNELS=triton` forces the kernels (CPU tensors then need TRITON_INTERPRET=1), `reference` the
    PyTorch references; the default runs Triton on CUDA only."""
    mode = os.environ.get("GMIXOUT_KERNELS", "auto")
    if mode == "reference":
        return False
    if mode == "triton":
        return True
    return t.is_cuda and _triton_available()


def grid(n: int, block: int) -> tuple[int]:
    """One program per block of `block` elements."""
    return ((n + block - 1) // block,)
