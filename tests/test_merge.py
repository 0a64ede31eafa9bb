"""Post-hoc merges: MonoSoup against a matrix worked out by hand, uniform and greedy soups."""

from __future__ import annotations

import math

import torch

from gmixout_cli.merge.soups import greedy_soup, monosoup, uniform_soup


def test_monosoup_on_a_hand_worked_matrix() -> None:
    # W0 = I, dW = diag(10, 2, 1): singular values 10, 2, 1 (distinct, so the truncation is unique).
    # q = (10, 2, 1)/13; H = -sum q ln q = 0.68698; exp(H) = 1.9876 -> k = 2.
    # dW_high = diag(10, 2, 0), dW_low = diag(0, 0, 1); P_k = 104/105; rho = (1/10)^2 = 0.01;
    # lambda_low = 0.01 + 0.99 * sqrt(1/105) = 0.106614; lambda_high = 0.893386.
    # W = I + 0.893386 * diag(10, 2, 0) + 0.106614 * diag(0, 0, 1) = diag(9.93386, 2.78677, 1.10661).
    q = torch.tensor([10.0, 2.0, 1.0]) / 13
    assert math.ceil(math.exp(-(q * q.log()).sum().item())) == 2
    lam_low = 0.01 + 0.99 * math.sqrt(1 - 104 / 105)
    assert abs(lam_low - 0.106614) < 1e-6
    w0 = {"w": torch.eye(3), "b": torch.zeros(3), "step": torch.tensor([3])}
    w1 = {"w": torch.eye(3) + torch.diag(torch.tensor([10.0, 2.0, 1.0])), "b": torch.ones(3), "step": torch.tensor([5])}
    merged = monosoup(w0, w1)
    torch.testing.assert_close(merged["w"], torch.diag(torch.tensor([9.93386, 2.78677, 1.10661])), atol=1e-4, rtol=0)
    assert torch.equal(merged["b"], w1["b"]) and torch.equal(merged["step"], w1["step"])  # 1-D: fine-tuned values


def test_monosoup_full_rank_and_conv_kernels() -> None:
    # k = rank (flat spectrum): rho = 0 and P_k = 1, so lambda_low = 0 and the update is kept whole
    w0 = {"w": torch.zeros(2, 2, 1, 1) + 1.0}
    w1 = {"w": w0["w"] + torch.diag(torch.tensor([1.0, 1.0])).view(2, 2, 1, 1)}
    torch.testing.assert_close(monosoup(w0, w1)["w"], w1["w"])
    # an update below 1e-6 of the weight's norm keeps the fine-tuned tensor as it is
    w2 = {"w": w0["w"] + 1e-9}
    assert torch.equal(monosoup(w0, w2)["w"], w2["w"])


def test_uniform_and_greedy_soups() -> None:
    states = [{"w": torch.full((2,), float(i)), "n": torch.tensor([i])} for i in range(3)]
    soup = uniform_soup(states)
    torch.testing.assert_close(soup["w"], torch.full((2,), 1.0))
    assert soup["n"].item() == 0
    # held-out score of a soup = minus the distance of its weight from 0.5: models 0 and 1 help, 2 does not
    evaluate = lambda s: -abs(s["w"][0].item() - 0.5)  # noqa: E731
    scores = [evaluate(s) for s in states]  # -0.5, -0.5, -1.5
    merged, chosen = greedy_soup(states, scores, evaluate)
    assert chosen == [0, 1] and merged["w"][0].item() == 0.5
