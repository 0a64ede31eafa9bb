"""GMixout's episodes, masks, fold-in and export, on a tiny model with the real method code."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gmixout_cli.config import build_config, merge_dicts, parse_overrides
from gmixout_cli.kernels import mask_seed, sample_indices
from gmixout_cli.methods import GMixout, make_method


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.fc2 = nn.Linear(64, 64)
        self.head = nn.Linear(64, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.fc2(F.gelu(self.fc1(x)))))


def mask_of(shape: torch.Size, p: float, seed: int, episode: int, index: int) -> torch.Tensor:
    """The dense boolean mask the engine samples for (seed, episode, target index)."""
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[sample_indices(numel, p, mask_seed(seed, episode, index), torch.device("cpu")).long()] = True
    return mask.view(shape)


def _run(overrides: list[str], steps: int, seed: int = 0,
         losses: list[float] | None = None) -> tuple[Tiny, dict, GMixout]:
    """Train Tiny's fc1, fc2 with GMixout (bf16 autocast on CPU with train.precision=bf16); `losses` collects
    each step's loss."""
    torch.manual_seed(seed)
    model = Tiny()
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    base = {"method": {"name": "gmixout"}, "train": {"lr": 1e-2, "weight_decay": 0.0}}
    cfg = build_config(merge_dicts(base, parse_overrides(overrides)))
    method = make_method(cfg, model, ["fc1.weight", "fc2.weight"], "head", steps)
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    for step in range(1, steps + 1):
        idx = torch.randint(0, 256, (32,))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
            loss = F.cross_entropy(model(x[idx]), y[idx])
        loss.backward()
        if losses is not None:
            losses.append(loss.item())
        method.after_backward()
        for opt in method.optimizers():
            opt.step()
            opt.zero_grad(set_to_none=True)
        method.after_step(step)
    method.finish()
    return model, w0, method


@pytest.mark.parametrize("p,episodes", [(0.8, 3), (0.9, 5)])
def test_changed_fraction_matches_one_minus_p_to_the_I(p: float, episodes: int) -> None:
    steps = episodes * 4
    model, w0, method = _run([f"method.p={p}", f"method.episodes={episodes}"], steps)
    assert method.summary()["episodes"] == episodes
    expected = 1 - p**episodes
    for name in ("fc1.weight", "fc2.weight"):
        changed = (model.state_dict()[name] != w0[name]).float()
        sigma = math.sqrt(expected * (1 - expected) / changed.numel())
        assert abs(changed.mean().item() - expected) < 4 * sigma, (name, changed.mean().item(), expected)
    # what is not a target stays exactly pretrained; the head trains densely
    assert torch.equal(model.fc1.bias, w0["fc1.bias"])
    assert not torch.equal(model.head.weight, w0["head.weight"])


def test_one_episode_changes_exactly_the_mask() -> None:
    model, w0, method = _run(["method.p=0.9", "method.episodes=1"], 5)
    mask = mask_of(w0["fc1.weight"].shape, 0.9, 0, 0, 0)
    changed = model.fc1.weight != w0["fc1.weight"]
    assert torch.equal(changed, mask)


def test_matches_autograd_reference_with_the_same_masks() -> None:
    """Dense W = A + s*M*delta kept in place == autograd through the parametrisation, over episodes."""
    p, lam, k, steps, lr = 0.7, 0.5, 3, 9, 1e-2
    model, w0, method = _run([f"method.p={p}", f"method.k={k}", f"method.lam={lam}"], steps)
    torch.manual_seed(0)
    ref = Tiny()
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    s = 1 / (1 - p)
    names = ["fc1.weight", "fc2.weight"]
    anchors = {n: dict(ref.named_parameters())[n].detach().clone() for n in names}
    for prm in ref.parameters():
        prm.requires_grad_(False)
    ref.head.weight.requires_grad_(True)
    ref.head.bias.requires_grad_(True)
    head_opt = torch.optim.AdamW([ref.head.weight, ref.head.bias], lr=lr, weight_decay=0.0)
    for episode in range(steps // k):
        masks = {n: mask_of(anchors[n].shape, p, 0, episode, i).float() for i, n in enumerate(names)}
        deltas = {n: torch.zeros_like(anchors[n], requires_grad=True) for n in names}
        opt = torch.optim.AdamW(list(deltas.values()), lr=lr, weight_decay=0.0)
        for _ in range(k):
            idx = torch.randint(0, 256, (32,))
            w1 = anchors["fc1.weight"] + s * masks["fc1.weight"] * deltas["fc1.weight"]
            w2 = anchors["fc2.weight"] + s * masks["fc2.weight"] * deltas["fc2.weight"]
            h = F.gelu(F.linear(F.gelu(F.linear(x[idx], w1, ref.fc1.bias)), w2, ref.fc2.bias))
            F.cross_entropy(ref.head(h), y[idx]).backward()
            opt.step()
            head_opt.step()
            opt.zero_grad()
            head_opt.zero_grad()
        for n in names:
            anchors[n] = lam * anchors[n] + (1 - lam) * (anchors[n] + s * masks[n] * deltas[n].detach())
    for n in names:
        torch.testing.assert_close(model.state_dict()[n], anchors[n], rtol=0, atol=1e-6)
    torch.testing.assert_close(model.head.weight, ref.head.weight.detach(), rtol=0, atol=1e-6)


def test_export_last_skips_the_final_fold_in() -> None:
    anchor_model, w0, _ = _run(["method.p=0.8", "method.k=2", "method.lam=0.5"], 4)
    last_model, _, _ = _run(["method.p=0.8", "method.k=2", "method.lam=0.5", "method.export=last"], 4)
    d_anchor = anchor_model.fc1.weight - w0["fc1.weight"]
    d_last = last_model.fc1.weight - w0["fc1.weight"]
    assert not torch.allclose(d_anchor, d_last)


def test_no_dense_gradient_or_state_is_kept_for_targets() -> None:
    torch.manual_seed(0)
    model = Tiny()
    cfg = build_config({"method": {"name": "gmixout", "p": 0.9, "k": 2}})
    method = make_method(cfg, model, ["fc1.weight", "fc2.weight"], "head", 4)
    F.cross_entropy(model(torch.randn(8, 32)), torch.randint(0, 4, (8,))).backward()
    assert model.fc1.weight.grad is None and model.fc2.weight.grad is None  # gathered and freed in the hook
    sparse = method.optimizers()[0]
    for group in sparse.param_groups:
        (vals,) = group["params"]
        assert vals.grad.shape == group["indices"].shape and group["indices"].dtype == torch.int32
        assert vals.numel() < 0.2 * group["weight"].numel()


def test_gradient_accumulation_equals_one_big_batch() -> None:
    x, y = torch.randn(16, 32), torch.randint(0, 4, (16,))
    grads = []
    for chunks in (1, 2):
        torch.manual_seed(0)
        model = Tiny()
        method = make_method(build_config({"method": {"name": "gmixout", "k": 2}}), model, ["fc1.weight"], "head", 4)
        for xc, yc in zip(x.chunk(chunks), y.chunk(chunks), strict=False):
            (F.cross_entropy(model(xc), yc, reduction="sum") / 16).backward()
        grads.append(method.optimizers()[0].param_groups[0]["params"][0].grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-7)


def test_reset_moments_off_carries_shared_entries() -> None:
    model, w0, method = _run(["method.p=0.5", "method.k=2", "method.reset_moments=false"], 6)
    state = method.optimizers()[0].state
    assert any(s["step"] > 2 for s in state.values())  # moments (and their step count) carried across episodes


def test_filter_masks_train_whole_output_filters() -> None:
    from gmixout_cli.kernels import keep_mask, sample_filter_indices

    shape = torch.Size([64, 8, 3, 3])
    idx = sample_filter_indices(shape, 0.75, 1234, torch.device("cpu"))
    rows = keep_mask(64, 0.75, 1234, torch.device("cpu"))
    dense = torch.zeros(shape.numel(), dtype=torch.bool)
    dense[idx.long()] = True
    dense = dense.view(64, -1)
    assert idx.dtype == torch.int32 and bool((idx[1:] > idx[:-1]).all())  # sorted, as the kernels expect
    assert torch.equal(dense.all(1), rows) and torch.equal(dense.any(1), rows)  # whole filters or nothing
    assert torch.equal(idx, sample_filter_indices(shape, 0.75, 1234, torch.device("cpu")))  # seeded

    model, w0, method = _run(["method.p=0.5", "method.episodes=1", "method.mask=filter"], 5)
    changed = model.fc1.weight != w0["fc1.weight"]
    assert changed.any() and torch.equal(changed.any(1), changed.all(1))  # each row trained whole, or not at all
