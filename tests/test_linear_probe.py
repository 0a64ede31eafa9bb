"""The linear-probe head: L2 chosen on the held-out split, the choice recorded."""

from __future__ import annotations

import torch
from torch import nn

from gmixout_cli.training.linear_probe import L2_GRID, fit_linear_probe


def _noisy_features(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two informative dimensions among 200 noisy ones."""
    labels = torch.randint(0, 3, (n,), generator=gen)
    feats = torch.randn(n, 202, generator=gen) * 2.0
    feats[:, 0] += labels.float() * 1.5
    feats[:, 1] -= labels.float() * 1.5
    return feats, labels


def test_probe_keeps_the_l2_with_the_best_held_out_top1_and_writes_it() -> None:
    gen = torch.Generator().manual_seed(0)
    train, val = _noisy_features(60, gen), _noisy_features(300, gen)
    head = nn.Linear(202, 3)
    fit = fit_linear_probe(head, *train, val=val)
    assert set(fit.grid) == {f"{l2:g}" for l2 in L2_GRID}
    best = max(v["val_top1"] for v in fit.grid.values())
    assert fit.val_top1 == best == fit.grid[f"{fit.l2:g}"]["val_top1"]
    assert fit.train_top1 >= fit.val_top1
    with torch.no_grad():
        held_out = (head(val[0]).argmax(1) == val[1]).float().mean().item()
    assert abs(held_out - fit.val_top1) < 1e-6  # the head holds the chosen probe


def test_probe_without_a_held_out_split_uses_the_grids_middle() -> None:
    gen = torch.Generator().manual_seed(1)
    feats, labels = _noisy_features(40, gen)
    fit = fit_linear_probe(nn.Linear(202, 3), feats, labels)
    assert fit.l2 == L2_GRID[len(L2_GRID) // 2] and fit.val_top1 is None and fit.grid == {}
