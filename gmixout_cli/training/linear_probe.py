"""Linear-probe head initialisation (LP-FT): fit the head on frozen features before fine-tuning."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader


@torch.no_grad()
def extract_features(features_fn, loader: DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (what the head sees) and labels of a whole loader, on the CPU."""
    feats, labels = [], []
    for x, y in loader:
        feats.append(features_fn(x.to(device)).float().cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


def fit_linear_probe(
    head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, l2: float = 1e-4, iters: int = 200
) -> float:
    """Multinomial logistic regression by full-batch L-BFGS; writes the head; returns train accuracy."""
    num_classes = head.out_features
    w = torch.zeros(num_classes, feats.shape[1], requires_grad=True)
    b = torch.zeros(num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=iters, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(feats @ w.T + b, labels) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        head.weight.copy_(w.detach().to(head.weight))
        head.bias.copy_(b.detach().to(head.bias))
        return (feats @ w.T + b).argmax(1).eq(labels).float().mean().item()
