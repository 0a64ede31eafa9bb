"""Linear-probe head initialisation (LP-FT): fit the head on frozen features before fine-tuning.

The probe is L2-regularised multinomial logistic regression; its regularisation is chosen on the run's
held-out split, as the LP-FT paper does (a fixed, weak L2 gives a head that is 100% right on its training
features and overconfident elsewhere, and every method that starts from it starts from that).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

L2_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)
"""Penalty on the summed squared weights, added to the mean cross-entropy (sklearn's C = 1 / (2 N l2))."""


@dataclass
class ProbeFit:
    """The probe kept and how it was chosen (top-1 fractions, held-out cross-entropy per l2)."""

    l2: float
    train_top1: float
    val_top1: float | None
    grid: dict[str, dict[str, float]] = field(default_factory=dict)


@torch.no_grad()
def extract_features(features_fn, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (what the head sees) and labels of a whole loader, on the CPU."""
    feats, labels = [], []
    for x, y in loader:
        feats.append(features_fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def _fit(feats: torch.Tensor, labels: torch.Tensor, num_classes: int, l2: float, iters: int,
         start: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS from `start` (default zeros): (weight, bias)."""
    w0, b0 = start or (torch.zeros(num_classes, feats.shape[1]), torch.zeros(num_classes))
    w, b = w0.clone().requires_grad_(True), b0.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w.T + b, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def _top1(w: torch.Tensor, b: torch.Tensor, feats: torch.Tensor, labels: torch.Tensor) -> float:
    return (feats @ w.T + b).argmax(1).eq(labels).float().mean().item()


def fit_linear_probe(
    head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor,
    val: tuple[torch.Tensor, torch.Tensor] | None = None, grid: tuple[float, ...] = L2_GRID, iters: int = 200,
) -> ProbeFit:
    """Fit the probe at each l2 of `grid` on the training features, keep the one with the best held-out
    top-1 (ties: the lower held-out cross-entropy), write it into `head`. Without `val`, the grid's middle."""
    num_classes = head.out_features
    if val is None or len(val[1]) == 0:
        l2 = grid[len(grid) // 2]
        w, b = _fit(feats, labels, num_classes, l2, iters)
        chosen = ProbeFit(l2, _top1(w, b, feats, labels), None)
    else:
        best: tuple[tuple[float, float], float, torch.Tensor, torch.Tensor] | None = None
        scores: dict[str, dict[str, float]] = {}
        start = None
        for l2 in sorted(grid, reverse=True):  # a regularisation path: each fit starts from the stronger one's
            w, b = start = _fit(feats, labels, num_classes, l2, iters, start)
            with torch.no_grad():
                logits = val[0] @ w.T + b
                acc = logits.argmax(1).eq(val[1]).float().mean().item()
                nll = F.cross_entropy(logits, val[1]).item()
            scores[f"{l2:g}"] = {"val_top1": acc, "val_loss": nll}
            if best is None or (acc, -nll) > best[0]:
                best = ((acc, -nll), l2, w, b)
        assert best is not None
        (acc, _), l2, w, b = best
        chosen = ProbeFit(l2, _top1(w, b, feats, labels), acc, scores)
    with torch.no_grad():
        head.weight.copy_(w.to(head.weight))
        head.bias.copy_(b.to(head.bias))
    return chosen
