"""`gmixout profile`: a few real training steps of a recipe, peak memory, throughput, fit to a budget."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch

from gmixout_cli.config import Config
from gmixout_cli.data import load_domain
from gmixout_cli.models import build_model
from gmixout_cli.training import input_size, make_trainer
from gmixout_cli.utils.memory import current_rss_bytes, peak_rss_since_reset, reset_peak_rss, resolve_device


def _state_bytes(trainer: Any) -> dict[str, int]:
    """Bytes of the model state: weights (params + buffers), the method's own tensors, optimizer moments."""
    model = trainer.model
    weights = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    moments = sum(v.numel() * v.element_size() for opt in trainer.optimizers for s in opt.state.values()
                  for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    return {"weights": weights, **trainer.method.state_bytes(), "optimizer_moments": moments}


def _full_finetune_state_bytes(model: torch.nn.Module) -> int:
    """What full fine-tuning holds for the same model: weights + buffers, fp32 gradients and two AdamW moments."""
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return sum(b.numel() * b.element_size() for b in model.buffers()) + 4 * params


def profile(cfg: Config, steps: int, budget_gb: float) -> dict[str, Any]:
    """Run `steps` timed optimizer steps (after one warm-up) on synthetic batches of the recipe's shape.

    `peak_memory_bytes` covers the whole process (model building included) and decides the budget;
    `steady_peak_bytes` covers the timed steps alone. Running out of device memory in the steps is an
    answer, not a failure: `oom: true, fits: false`.

    Image content does not change time or memory, so random tensors stand in for data; the class
    count comes from the recipe's data when given.
    """
    device = resolve_device(cfg.train.device)
    # CPU: what the process holds before the model exists (torch and the model libraries, ~0.7 GB), shared by
    # every method; reported so that ratios can be read with and without it
    baseline = current_rss_bytes() if device.type == "cpu" else None
    torch.manual_seed(cfg.train.seed)
    classes = load_domain(cfg.data).classes if cfg.data.root else [f"class {i}" for i in range(1000)]
    model_cfg = cfg.model
    if model_cfg.head_init == "auto":  # head values do not change step cost; a linear probe would need data
        model_cfg = dataclasses.replace(model_cfg, head_init="zero")
    built = build_model(model_cfg, classes, cfg.train.seed)
    built.model.to(device)
    size = input_size(cfg, built)
    bs = cfg.train.batch_size
    trainer = make_trainer(cfg, built, device, total_steps=steps + 1)
    x = torch.randn(bs, 3, size, size)
    y = torch.randint(0, len(classes), (bs,))
    common = {"model": cfg.model.name, "method": cfg.method.name, "device": str(device), "batch_size": bs,
              "image_size": size, "precision": cfg.train.precision, "steps": steps,
              "budget_bytes": int(budget_gb * 1024**3),
              "full_finetune_state_bytes": _full_finetune_state_bytes(built.model)}
    if baseline is not None:
        common["process_baseline_bytes"] = baseline
    try:
        measured = _measure(trainer, x, y, steps, device, int(budget_gb * 1024**3))
    except torch.OutOfMemoryError:  # an answer, not a failure: this setting does not fit this device
        total = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
        return dict(common, oom=True, fits=False, device_memory_bytes=total)
    return dict(common, **measured, method_summary=trainer.method.summary())  # after the first episode began


def _measure(trainer: Any, x: torch.Tensor, y: torch.Tensor, steps: int, device: torch.device,
             budget: int) -> dict[str, Any]:
    """Warm-up step, then `steps` timed steps: peaks, throughput, state."""
    bs = x.shape[0]
    trainer.train_step(x, y)  # warm-up: allocator, lazy optimizer state, kernel selection
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start_peak = torch.cuda.max_memory_allocated(device)  # model building and the warm-up step
        torch.cuda.reset_peak_memory_stats(device)
    else:
        start_peak = peak_rss_since_reset()
        reset_peak_rss()
    start = time.perf_counter()
    for _ in range(steps):
        trainer.train_step(x, y)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    steady = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else peak_rss_since_reset()
    peak = max(start_peak, steady)
    state = _state_bytes(trainer)
    return {
        "oom": False, "peak_memory_bytes": int(peak), "steady_peak_bytes": int(steady),
        "peak_kind": "cuda_max_allocated" if device.type == "cuda" else "peak_rss",
        "images_per_s": steps * bs / elapsed, "step_time_s": elapsed / steps,
        "fits": peak <= budget, "state_bytes": state, "state_total_bytes": sum(state.values()),
    }
