"""The trainer's own model and the exported file are the same function (zero inference overhead)."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from gmixout_cli.config import build_config
from gmixout_cli.models import build_model, save_classifier
from gmixout_cli.training import make_trainer


@pytest.mark.parametrize("method", ["gmixout", "full"])
def test_exported_file_reproduces_the_trainers_logits(tmp_path, method: str) -> None:
    cfg = build_config({
        "model": {"name": "timm:test_vit", "weights": "random", "head_init": "zero"},
        "train": {"lr": 1e-3, "seed": 3},
        "method": {"name": method, **({"p": 0.8, "k": 2} if method == "gmixout" else {})},
    })
    classes = ["a", "b", "c"]
    built = build_model(cfg.model, classes, cfg.train.seed)
    before = {k: v.clone() for k, v in built.model.state_dict().items()}
    trainer = make_trainer(cfg, built, torch.device("cpu"), total_steps=5)
    gen = torch.Generator().manual_seed(0)
    size = built.image_size
    for _ in range(5):
        trainer.train_step(torch.randn(4, 3, size, size, generator=gen), torch.randint(0, 3, (4,), generator=gen))
    trainer.method.finish()
    built.model.eval()
    x = torch.randn(6, 3, size, size, generator=gen)
    with torch.no_grad():
        trainer_logits = built.model(x)
    path = tmp_path / "model.safetensors"
    save_classifier(path, built, classes, size)

    # plain timm, no gmixout: what a user deploys
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    plain = timm.create_model(meta["arch"], pretrained=False, num_classes=len(json.loads(meta["class_names"])))
    plain.load_state_dict(load_file(str(path)), strict=True)
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), trainer_logits, rtol=0, atol=1e-5)
    changed = [k for k, v in built.model.state_dict().items() if not torch.equal(v, before[k])]
    if method == "gmixout":  # only the targets (qkv, proj, fc1, fc2 of each block) and the head moved
        assert changed and all(k.startswith("head") or k.split(".")[-2] in ("qkv", "proj", "fc1", "fc2")
                               for k in changed)


def _train_state(overrides: dict, steps: int = 3,
                 on_phase: Callable[[str], None] | None = None) -> dict[str, torch.Tensor]:
    base = {"model": {"name": "timm:test_vit", "weights": "random", "head_init": "zero"},
            "train": {"lr": 1e-3, "seed": 1, "batch_size": 8}, "method": {"name": "gmixout", "p": 0.8, "k": 2}}
    for key, value in overrides.items():
        section, field = key.split(".")
        base[section][field] = value
    cfg = build_config(base)
    built = build_model(cfg.model, ["a", "b"], cfg.train.seed)
    trainer = make_trainer(cfg, built, torch.device("cpu"), total_steps=steps)
    trainer.on_phase = on_phase
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        size = built.image_size
        trainer.train_step(torch.randn(8, 3, size, size, generator=gen), torch.randint(0, 2, (8,), generator=gen))
    trainer.method.finish()
    return {k: v.clone() for k, v in built.model.state_dict().items()}


def test_micro_batches_and_checkpointing_give_the_same_training() -> None:
    reference = _train_state({})
    for variant in ({"train.micro_batch_size": 4}, {"train.grad_checkpointing": True}):
        state = _train_state(variant)
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, rtol=1e-4, atol=1e-5, msg=f"{variant} {key}")


def test_phase_hook_sees_every_phase_and_changes_nothing() -> None:
    seen: list[str] = []
    hooked = _train_state({"train.micro_batch_size": 4}, on_phase=seen.append)
    plain = _train_state({"train.micro_batch_size": 4})
    assert all(torch.equal(hooked[k], v) for k, v in plain.items())
    one_step = ["forward", "backward"] * 2 + ["after_backward", "clip", "optimizer", "after_step"]
    assert seen == one_step * 3


def test_out_of_memory_becomes_advice() -> None:
    from gmixout_cli.errors import UserError
    from gmixout_cli.utils.memory import oom_advice

    with pytest.raises(UserError, match=r"train.micro_batch_size=16 .*grad_checkpointing=true.*gmixout profile"):
        with oom_advice(32, None):
            raise torch.OutOfMemoryError("CUDA out of memory")
