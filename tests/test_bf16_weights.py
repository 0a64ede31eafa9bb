"""GMixout with bf16 target weights (method.weight_dtype=bf16): fp32 anchor values at the kept entries, the
fold-in rounded stochastically, and training that follows the fp32-weight run under the same bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_gmixout import Tiny, _run  # the same two-layer model and loop as GMixout's own tests

from gmixout_cli.config import build_config
from gmixout_cli.errors import UserError
from gmixout_cli.kernels import fold_in_rounded_reference, stochastic_round_bf16_reference
from gmixout_cli.methods import GMixout, make_method

TARGETS = ["fc1.weight", "fc2.weight"]


def _train(weight_dtype: str, steps: int = 12, k: int = 3) -> tuple[Tiny, GMixout, list[float]]:
    losses: list[float] = []
    model, _, method = _run([f"method.weight_dtype={weight_dtype}", "train.precision=bf16", f"method.k={k}",
                             "method.p=0.7", "train.lr=3e-3"], steps, losses=losses)
    return model, method, losses


def test_targets_are_stored_in_bf16_with_fp32_anchor_values_at_the_kept_entries() -> None:
    model, method, _ = _train("bf16", steps=2, k=10)  # still in the first episode before `finish`'s fold-in
    assert model.fc1.weight.dtype == model.fc2.weight.dtype == torch.bfloat16
    assert model.head.weight.dtype == model.fc1.bias.dtype == torch.float32  # only the targets change storage
    group = method.optimizers()[0].param_groups[0]
    assert group["anchor"].dtype == torch.float32 and group["anchor"].shape == group["indices"].shape
    bytes_ = method.state_bytes()
    assert bytes_["sparse_anchor"] == bytes_["sparse_values"]
    tensors, _ = method.state_dict()
    assert {f"{n}.anchor" for n in TARGETS} <= tensors.keys()  # a checkpoint resumes the exact anchor


def test_bf16_weights_follow_fp32_weights_under_the_same_autocast() -> None:
    """Within an episode W = bf16(A + s*delta) is autocast's own cast of the fp32 weight, so the two runs see
    the same forward pass; across fold-ins they part only by the anchor's rounding (a bf16 step at most)."""
    ref, _, ref_losses = _train("fp32")
    ours, _, losses = _train("bf16")
    assert losses[:3] == pytest.approx(ref_losses[:3], rel=1e-3)  # the first episode: the same computation
    assert losses == pytest.approx(ref_losses, rel=2e-2)
    torch.manual_seed(0)
    start = Tiny().state_dict()
    for name in TARGETS:  # the same update: direction and size, up to the anchor's rounding
        ours_update, ref_update = ours.state_dict()[name].float() - start[name], ref.state_dict()[name] - start[name]
        assert F.cosine_similarity(ours_update.flatten(), ref_update.flatten(), dim=0) > 0.995
        assert ours_update.norm() == pytest.approx(ref_update.norm().item(), rel=0.01)
    assert torch.allclose(ours.head.weight, ref.head.weight, atol=1e-2)


def test_stochastic_rounding_keeps_updates_below_half_a_bf16_step() -> None:
    """An increment of a tenth of a bf16 step: round-to-nearest drops it at every fold-in, stochastic rounding
    keeps it in expectation."""
    n = 1 << 16
    weight = torch.ones(n, dtype=torch.bfloat16)
    idx = torch.arange(n, dtype=torch.int32)
    step = 2**-7  # bf16's spacing just above 1.0
    vals = torch.full((n,), 0.1 * step)
    nearest = (weight.float() + vals).to(torch.bfloat16)
    assert torch.equal(nearest, weight)  # the update is lost
    fold_in_rounded_reference(weight, idx, torch.ones(n), vals, 1.0, seed=7)
    assert set(weight.float().unique().tolist()) == {1.0, 1.0 + step}
    assert weight.float().mean().item() == pytest.approx(1.0 + 0.1 * step, abs=4 * step * (0.09 / n) ** 0.5)
    # negative values round symmetrically in magnitude, and the bits depend on the seed only
    x = torch.full((n,), -(1.0 + 0.25 * step))
    rounded = stochastic_round_bf16_reference(x, idx, 3).float()
    assert rounded.mean().item() == pytest.approx(x[0].item(), abs=4 * step * (0.19 / n) ** 0.5)
    assert torch.equal(stochastic_round_bf16_reference(x, idx, 3), stochastic_round_bf16_reference(x, idx, 3))


def test_bf16_weights_need_a_bf16_forward_pass() -> None:
    cfg = build_config({"method": {"name": "gmixout", "weight_dtype": "bf16"}, "train": {"precision": "fp32"}})
    with pytest.raises(UserError, match="train.precision=bf16"):
        make_method(cfg, Tiny(), TARGETS, "head", 4)
