"""Model soups (uniform, greedy) and MonoSoup (docs/METHOD.md, exact), on state dicts of one architecture."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from gmixout_cli.merge.wise import State


def uniform_soup(states: list[State]) -> State:
    """The mean of every floating tensor; integer buffers come from the first model."""
    out = {}
    for name, first in states[0].items():
        if first.is_floating_point():
            total = first.double()
            for s in states[1:]:  # in order, as the sum of the states
                total = total + s[name].double()
            out[name] = (total / len(states)).to(first.dtype)
        else:
            out[name] = first.clone()
    return out


def greedy_soup(
    states: list[State], scores: list[float], evaluate: Callable[[State], float]
) -> tuple[State, list[int]]:
    """Wortsman et al.: by decreasing held-out score, add a model only if the soup's held-out score improves.

    Returns the soup and the indices (into `states`) of its ingredients.
    """
    order = sorted(range(len(states)), key=lambda i: -scores[i])
    chosen = [order[0]]
    best = scores[order[0]]
    for i in order[1:]:
        score = evaluate(uniform_soup([states[j] for j in [*chosen, i]]))
        if score > best:
            chosen.append(i)
            best = score
    return uniform_soup([states[j] for j in chosen]), chosen


def monosoup(base: State, tuned: State) -> State:
    """MonoSoup: split each matrix update into its top-k spectral part and the rest, reweighted (docs/METHOD.md).

    For ndim >= 2 tensors (conv kernels as [out, rest]) with ||dW|| / ||W0|| > 1e-6: k is the exponential of
    the entropy of the normalised singular values (ceil, clamped to [1, rank]); P_k the top-k energy share;
    rho = (s_{k+1}/s_1)^2 (0 when k = rank); lambda_low = rho + (1-rho) sqrt(1-P_k); lambda_high = 1 - lambda_low.
    1-D tensors keep their fine-tuned values.
    """
    out = {}
    for name, w1 in tuned.items():
        w0 = base[name]
        if w1.ndim < 2 or not w1.is_floating_point():
            out[name] = w1.clone()
            continue
        delta = (w1.double() - w0.double()).reshape(w1.shape[0], -1)
        if delta.norm() <= 1e-6 * w0.double().norm():
            out[name] = w1.clone()
            continue
        u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        rank = s.numel()
        q = s.abs() / s.abs().sum()
        entropy = -(q[q > 0] * q[q > 0].log()).sum().item()
        k = min(max(math.ceil(math.exp(entropy)), 1), rank)
        high = (u[:, :k] * s[:k]) @ vh[:k]
        low = delta - high
        energy = (s**2).sum()
        p_k = ((s[:k] ** 2).sum() / energy).item()
        rho = (s[k] / s[0]).item() ** 2 if k < rank else 0.0
        lam_low = rho + (1.0 - rho) * math.sqrt(max(0.0, 1.0 - p_k))
        merged = w0.double().reshape_as(delta) + (1.0 - lam_low) * high + lam_low * low
        out[name] = merged.reshape(w1.shape).to(w1.dtype)
    return out
