"""Mask sampling: a fresh mask per episode, reproducible from (seed, episode, tensor index) alone."""

from __future__ import annotations

import math

import torch


def mask_seed(seed: int, episode: int, index: int) -> int:
    """One 63-bit seed per (run seed, episode, target tensor): same masks on every rank and after a restart."""
    return ((seed * 1_000_003 + episode) * 1_000_033 + index) % (2**63 - 1)


def sample_mask(
    shape: torch.Size, p: float, seed: int, episode: int, index: int, exact: bool = False
) -> torch.Tensor:
    """Boolean mask with each entry kept with probability 1-p (or exactly round((1-p)*numel) kept).

    Sampled on the CPU so that the same seed gives the same mask on any device.
    """
    gen = torch.Generator().manual_seed(mask_seed(seed, episode, index))
    numel = math.prod(shape)
    if exact:
        keep = round((1.0 - p) * numel)
        mask = torch.zeros(numel, dtype=torch.bool)
        mask[torch.randperm(numel, generator=gen)[:keep]] = True
        return mask.view(shape)
    return torch.rand(shape, generator=gen) >= p
