"""Top-1 accuracy on the held-out in-domain split and on every out-of-domain sibling."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from gmixout_cli.data import DomainData, Item, load_eval_domain, make_loader, verify_images


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on request, else a no-op."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@torch.no_grad()
def top1(model: nn.Module, loader: Iterable, device: torch.device, precision: str = "fp32") -> float:
    """Fraction of correctly classified images."""
    model.eval()
    correct = total = 0
    for x, y in loader:
        with autocast(device, precision):
            logits = model(x.to(device, non_blocking=True))
        correct += (logits.argmax(1).cpu() == y).sum().item()
        total += y.numel()
    return correct / max(1, total)


def ood_sets(data: DomainData, ood: list[str], unreadable: str, workers: int) -> tuple[dict[str, list[Item]], int]:
    """The images of each out-of-domain sibling, checked up front (class sets and unreadable files)."""
    sets, skipped = {}, 0
    for name in ood:
        items = load_eval_domain(data, name)
        sets[name], bad = verify_images(items, unreadable, workers, what=f"the out-of-domain set {name}")
        skipped += len(bad)
    return sets, skipped


def evaluate_domains(
    model: nn.Module,
    data: DomainData,
    ood: dict[str, list[Item]],
    transform: Callable,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    precision: str = "fp32",
    on_domain: Callable[[str, float], None] | None = None,
) -> dict:
    """{"id": {domain: top1}, "ood": {domain: top1}, "ood_avg": mean} with top-1 as fractions."""

    def run(items: list) -> float:
        return top1(model, make_loader(items, transform, batch_size, False, num_workers, 0), device, precision)

    result: dict = {"id": {data.domain: run(data.val)}, "ood": {}}
    if on_domain:
        on_domain(data.domain, result["id"][data.domain])
    for name, items in ood.items():
        result["ood"][name] = run(items)
        if on_domain:
            on_domain(name, result["ood"][name])
    result["ood_avg"] = sum(result["ood"].values()) / len(result["ood"]) if result["ood"] else None
    return result
