"""Dense Mixout (the original method, docs/METHOD.md): exactness at p=0, eval = θ, unbiasedness, export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from conftest import build_method
from gmixout_cli.methods.mixout import Mixout


@pytest.fixture(autouse=True)
def one_thread():  # noqa: ANN201 - a generator fixture
    """Tiny ops: a second intra-op thread only adds contention (100x slower on a busy 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TARGETS = ["inp.weight", "attn.in_proj_weight", "attn.out_proj.weight", "mlp.weight"]


class Tiny(nn.Module):
    """Linear layers around one nn.MultiheadAttention, like a one-block ViT on [B, T, 8] tokens."""

    def __init__(self, checkpointing: bool = False) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 16)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.mlp = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)
        self.checkpointing = checkpointing

    def block(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return h + torch.relu(self.mlp(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        h = checkpoint(self.block, h, use_reentrant=False) if self.checkpointing else self.block(h)
        return self.head(h.mean(1))


def make_model(seed: int = 0, checkpointing: bool = False) -> Tiny:
    torch.manual_seed(seed)
    return Tiny(checkpointing)


def task(n: int = 48, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Three separable classes: the token mean is shifted along one of three directions."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    x = torch.randn(n, 4, 8, generator=g) * 0.5
    x[torch.arange(n), :, y] += 2.0
    return x, y


def train_step(model: nn.Module, method: object, x: torch.Tensor, y: torch.Tensor, step: int) -> float:
    """The package loop's step: backward, hand-over, global clip over every optimizer's params, step."""
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    method.after_backward()
    params = [p for opt in method.optimizers() for g in opt.param_groups for p in g["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    for opt in method.optimizers():
        opt.step()
        opt.zero_grad(set_to_none=True)
    method.after_step(step)
    return loss.item()


def mixout(model: nn.Module, p: float, seed: int = 0, lr: float = 1e-2) -> Mixout:
    method = build_method("mixout", model, TARGETS, p=p, seed=seed, lr=lr, head_lr=lr, weight_decay=0.1)
    method.set_train_mode(model)
    return method


def theta(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, attr = name.rpartition(".")
    return model.get_submodule(module_name).parametrizations[attr].original


def test_p0_equals_full_finetuning_step_for_step() -> None:
    ref, mix = make_model(), make_model()
    full = build_method("full", ref, [], lr=1e-2, head_lr=1e-2, weight_decay=0.1)
    full.set_train_mode(ref)
    method = mixout(mix, p=0.0)
    x, y = task()
    for step in range(1, 6):
        loss_ref = train_step(ref, full, x, y, step)
        loss_mix = train_step(mix, method, x, y, step)
        assert loss_mix == pytest.approx(loss_ref, rel=1e-6, abs=1e-7)
    method.finish()
    for (name, a), (_, b) in zip(ref.state_dict().items(), mix.state_dict().items(), strict=False):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_eval_forward_uses_theta() -> None:
    model = make_model()
    method = mixout(model, p=0.7)
    x, y = task()
    for step in range(1, 4):
        train_step(model, method, x, y, step)
    model.eval()
    for name in TARGETS:
        module_name, _, attr = name.rpartition(".")
        assert getattr(model.get_submodule(module_name), attr) is theta(model, name)
    plain = make_model()
    plain.load_state_dict({k.replace("parametrizations.", "").replace(".original", ""): v
                           for k, v in model.state_dict().items()})
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x), rtol=0, atol=0)


def test_training_weights_are_unbiased_and_mixed() -> None:
    model = make_model()
    method = mixout(model, p=0.6)
    with torch.no_grad():  # move θ away from u so that the mask matters
        for name in TARGETS:
            theta(model, name).add_(torch.randn_like(theta(model, name)))
    x = torch.randn(2, 4, 8)
    with torch.no_grad():  # each training forward draws anew (the model's pre-hook); eval forwards don't
        assert not torch.equal(model(x), model(x))
        model.eval()
        draws = method.shared.draw
        model(x)
        assert method.shared.draw == draws
        model.train()
    n = 3000
    for name in ["inp.weight", "attn.in_proj_weight"]:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        u = module.parametrizations[attr][0].u
        th = theta(model, name).detach()
        total = torch.zeros_like(th)
        first = None
        with torch.no_grad():
            for _ in range(n):
                method.shared.draw += 1  # what the model's forward pre-hook does: a fresh mask
                w = getattr(module, attr)
                first = w.clone() if first is None else first
                total += w
        assert not torch.equal(first, w), "masks must change between forwards"
        # W = u + M*(θ-u)/(1-p), so each entry's spread around θ is |θ-u| * sqrt(p/(1-p)).
        sd = (th - u).abs() * (0.6 / 0.4) ** 0.5
        err = (total / n - th).abs()
        assert (err <= 5 * sd / n**0.5 + 1e-5).all(), name
    method.finish()


def test_same_seed_same_masks_and_checkpointing_consistent() -> None:
    x, y = task()
    grads = []
    for ckpt in (False, True, False):
        model = make_model(checkpointing=ckpt)
        mixout(model, p=0.5, seed=3)
        F.cross_entropy(model(x), y).backward()
        grads.append({n: theta(model, n).grad.clone() for n in TARGETS})
    for name in TARGETS:
        # A recomputed block must see its forward's mask, or θ's gradient would be for another W.
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-6, msg=name)
        assert torch.equal(grads[2][name], grads[0][name]), name
    model = make_model()
    mixout(model, p=0.5, seed=4)
    F.cross_entropy(model(x), y).backward()
    assert not torch.equal(theta(model, "mlp.weight").grad, grads[0]["mlp.weight"])


def test_finish_restores_the_library_state_dict_with_theta() -> None:
    model = make_model()
    keys = list(model.state_dict())
    method = mixout(model, p=0.9)
    assert method.state_bytes()["pretrained_copy"] == sum(theta(model, n).numel() * 4 for n in TARGETS)
    x, y = task()
    for step in range(1, 4):
        train_step(model, method, x, y, step)
    thetas = {n: theta(model, n).detach().clone() for n in TARGETS}
    method.finish()
    state = model.state_dict()
    assert list(state) == keys  # same names, same order
    assert type(model.attn) is nn.MultiheadAttention and type(model.mlp) is nn.Linear
    for name, value in thetas.items():
        assert torch.equal(state[name], value), name
    model.train()
    with torch.no_grad():  # no mixing left after export, even in training mode
        assert torch.equal(model.mlp.weight, thetas["mlp.weight"])


def test_loss_falls_on_a_separable_task() -> None:
    model = make_model()
    method = mixout(model, p=0.9, lr=3e-3)
    x, y = task(96)
    losses = [train_step(model, method, x, y, step) for step in range(1, 51)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5
    method.finish()
    model.eval()
    with torch.no_grad():
        assert (model(x).argmax(1) == y).float().mean() > 0.9


def test_one_mask_per_target_per_forward_and_no_cached_weight_after_it() -> None:
    model = make_model()
    method = mixout(model, p=0.5)
    calls: dict[str, int] = {}
    for name in TARGETS:
        module_name, _, attr = name.rpartition(".")
        pm = model.get_submodule(module_name).parametrizations[attr][0]
        draw = pm.mask

        def counted(draw=draw, name=name) -> torch.Tensor:
            calls[name] = calls.get(name, 0) + 1
            return draw()

        pm.mask = counted
    x, y = task()
    F.cross_entropy(model(x), y).backward()  # nn.MultiheadAttention reads in_proj_weight three times
    assert calls == {name: 1 for name in TARGETS}
    assert method.shared.slot is None
