"""`gmixout profile --predict`: the predicted peak against the measured one on this CPU, and the command."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from gmixout_cli.config import load_config
from gmixout_cli.profiling.predict import activation_ratio, measure, predict


def _cfg(model: str, method: str, batch: int, *extra: str):  # noqa: ANN202
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the default recipe's GMixout fields, left out for other methods
        return load_config(None, [f"method.name={method}", f"train.batch_size={batch}", "train.precision=fp32",
                                  *extra], {"model.name": model})


@pytest.mark.parametrize(("model", "method", "extra"), [
    ("timm:test_vit", "full", ()),
    ("timm:test_vit", "lora", ("train.grad_checkpointing=true",)),
    ("timm:test_efficientnet", "gmixout", ("data.image_size=96", "train.micro_batch_size=8", "method.mask=filter")),
    ("timm:test_vit", "gmixout", ("train.precision=bf16", "method.weight_dtype=bf16")),  # CPU autocast measured
])  # more methods and models: benchmarks/predict_memory.py validate
def test_the_predicted_peak_is_within_15_percent_of_the_measured_one(model: str, method: str, extra: tuple) -> None:
    cfg = _cfg(model, method, 16, *extra)
    predicted = predict(cfg, 10, 1 << 40)
    measured = measure(cfg, 10, torch.device("cpu"))
    assert 0.85 <= predicted["predicted_peak_bytes"] / measured <= 1.15, (predicted["breakdown"], measured)
    parts = predicted["breakdown"]
    assert parts["weights"] > 0 and parts["activations"] > 0
    assert predicted["predicted_peak_bytes"] == sum(parts.values())


def test_gmixout_holds_a_tenth_of_full_fine_tunings_optimizer_state() -> None:
    full = predict(_cfg("timm:test_vit", "full", 4), 10, 1 << 40)["breakdown"]["optimizer_state"]
    sparse = predict(_cfg("timm:test_vit", "gmixout", 4), 10, 1 << 40)["breakdown"]["optimizer_state"]
    assert 0 < sparse < 0.3 * full


def test_bf16_target_weights_and_autocast_weight_copies() -> None:
    """bf16 target weights halve the targets' bytes. Autocast caches bf16 copies of trained fp32 weights until
    the forward pass ends; with checkpointing no saved activation holds them, so they make the forward end
    the peak; bf16 weights have none (the head's are all that is left)."""
    from gmixout_cli.models import resolve_targets
    from gmixout_cli.profiling.predict import _meta_model

    base = ("train.precision=bf16", "train.grad_checkpointing=true")
    cfg32 = _cfg("timm:test_vit", "gmixout", 4, *base)
    built = _meta_model(cfg32, 10)
    params = dict(built.model.named_parameters())
    targets = sum(params[n].numel() for n in resolve_targets(built, cfg32.model.targets))
    fp32 = predict(cfg32, 10, 1 << 40)
    bf16 = predict(_cfg("timm:test_vit", "gmixout", 4, *base, "method.weight_dtype=bf16"), 10, 1 << 40)
    assert fp32["breakdown"]["weights"] - bf16["breakdown"]["weights"] == 2 * targets
    assert 2 * targets <= fp32["autocast_weight_copies_bytes"] <= 2 * targets * 1.1  # the targets, and the head
    assert bf16["autocast_weight_copies_bytes"] < 0.1 * fp32["autocast_weight_copies_bytes"]
    # where weights outweigh a small batch's activations, the forward end is the peak, copies included
    tiny = predict(_cfg("timm:vit_tiny_patch16_224", "gmixout", 2, *base), 10, 1 << 40)
    assert tiny["peak_at"] == "forward end"
    assert tiny["breakdown"]["transient"] >= tiny["autocast_weight_copies_bytes"] >= 2 * 5_000_000


def test_bf16_autocast_saves_smaller_activations_by_cuda_rules() -> None:
    ratio = activation_ratio(_cfg("timm:test_vit", "full", 4, "train.precision=bf16"), 10)
    assert 0.4 < ratio < 0.95  # matmul inputs and outputs in bf16, layer norms and the residual stream in fp32


def test_profile_predict_prints_a_breakdown_per_method_and_a_verdict(cli) -> None:  # noqa: ANN001
    code, out, err = cli("profile", "--predict", "--json", "--model", "timm:test_vit", "train.batch_size=4",
                         "--budget", "0.5")
    assert code == 0, err
    report = json.loads(out)
    assert set(report["predictions"]) == {"gmixout", "full", "lora r=8"}
    for row in report["predictions"].values():
        assert row["kind"] == "prediction" and row["fits"] is False  # 0.5 GiB holds not even the CUDA context
        assert row["predicted_peak_bytes"] == sum(row["breakdown"].values())
    # the user's GMixout fields reach the GMixout row only, not the full and LoRA rows
    code, out, err = cli("profile", "--predict", "--model", "timm:test_vit", "train.batch_size=4", "--budget", "24",
                         "method.weight_dtype=bf16", "train.precision=bf16", "method.p=0.95")
    assert code == 0, err
    assert "predicted CUDA peak" in out and "fits" in out and "lora r=8" in out and "gmixout (bf16 weights)" in out
