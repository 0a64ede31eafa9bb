"""Every training method through the one trainer: it learns a tiny separable task and exports a plain model."""

from __future__ import annotations

import pytest
import timm
import torch

from gmixout_cli.config import build_config
from gmixout_cli.models import build_model
from gmixout_cli.training import make_trainer

METHODS = {
    "full": {}, "lp": {}, "lpft": {}, "mixout": {"p": 0.5},
    "gmixout": {"p": 0.8, "k": 5}, "randmask": {"p": 0.8, "episodes": 1, "lam": 0.0},
    "lora": {"r": 4}, "dora": {"r": 4}, "mlae": {"r": 4, "p": 0.5},
}


def _separable(n: int, size: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Two classes whose images differ in mean brightness."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.randn(n, 3, size, size, generator=gen) * 0.5 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return x, y


@pytest.mark.parametrize("method", sorted(METHODS))
def test_method_learns_and_exports_plain_weights(method: str) -> None:
    cfg = build_config({
        # the linear probe itself is fitted by `finetune`; here every head starts at zero
        "model": {"name": "timm:test_vit", "weights": "random",
                  "head_init": "linear_probe" if method == "lpft" else "zero"},
        "train": {"lr": 1e-3, "head_lr": 1e-2, "weight_decay": 0.0, "seed": 0},
        "method": {"name": method, **METHODS[method]},
    })
    built = build_model(cfg.model, ["a", "b"], cfg.train.seed)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    steps = 25
    trainer = make_trainer(cfg, built, torch.device("cpu"), total_steps=steps)
    gen = torch.Generator().manual_seed(0)
    x, y = _separable(64, built.image_size, gen)
    losses = [trainer.train_step(x[i % 8 * 8:(i % 8 + 1) * 8], y[i % 8 * 8:(i % 8 + 1) * 8]) for i in range(steps)]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5, losses
    trainer.method.finish()
    state = built.model.state_dict()
    assert list(state) == list(before)  # the library's own names, nothing added by the method
    plain = timm.create_model("test_vit", pretrained=False, num_classes=2)
    plain.load_state_dict(state, strict=True)
    built.model.eval()
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x[:4]), built.model(x[:4]), rtol=0, atol=1e-5)
    changed = {k for k in state if not torch.equal(state[k], before[k])}
    if method == "lp":
        assert changed == {"head.weight", "head.bias"}
    else:
        assert any(k.startswith("blocks.") for k in changed)


@pytest.mark.parametrize("method,mode,moves", [
    ("full", "auto", False), ("full", "update", True), ("lora", "auto", False), ("lora", "update", True),
    ("mixout", "auto", False), ("mixout", "update", True),
    ("gmixout", "auto", False), ("gmixout", "update", True),
])
def test_norm_stats_override_the_methods_batchnorm_mode(method: str, mode: str, moves: bool) -> None:
    cfg = build_config({
        "model": {"name": "timm:test_efficientnet", "weights": "random", "head_init": "zero"},
        "method": {"name": method, "norm_stats": mode, **({"k": 5} if method == "gmixout" else {})},
    })
    built = build_model(cfg.model, ["a", "b"], 0)
    stats = {k: v.clone() for k, v in built.model.state_dict().items() if k.endswith("running_mean")}
    trainer = make_trainer(cfg, built, torch.device("cpu"), total_steps=2)
    x, y = _separable(8, 32, torch.Generator().manual_seed(0))
    trainer.train_step(x, y)
    after = built.model.state_dict()
    assert any(not torch.equal(after[k], v) for k, v in stats.items()) == moves


def test_norm_stats_on_a_model_without_batchnorm_is_a_user_error() -> None:
    from gmixout_cli.errors import UserError

    cfg = build_config({"model": {"name": "timm:test_vit", "weights": "random", "head_init": "zero"},
                        "method": {"name": "full", "norm_stats": "frozen"}})
    built = build_model(cfg.model, ["a", "b"], 0)
    with pytest.raises(UserError, match="no BatchNorm layers"):
        make_trainer(cfg, built, torch.device("cpu"), total_steps=2)
