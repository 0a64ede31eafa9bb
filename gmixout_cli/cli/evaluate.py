"""`gmixout evaluate`: in-domain and per-domain out-of-domain top-1 of a run or a weight file."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gmixout_cli.cli.common import console, err_console, scores_table, split_csv
from gmixout_cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command()(evaluate)


def evaluate(
    target: str = typer.Argument(None, help="Run folder or .safetensors file (default: the latest run).",
                                 show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="ROOT/DOMAIN to evaluate on (default: the run's own data).",
                             show_default=False),
    ood: str = typer.Option(None, "--ood", help="Comma-separated sibling domains (default: all siblings).",
                            show_default=False),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of a table."),
    batch_size: int = typer.Option(128, "--batch-size", min=1, help="Images per batch."),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    workers: int = typer.Option(2, "--workers", min=0, help="Data-loading worker processes."),
) -> None:
    """Top-1 on the held-out in-domain split and on every out-of-domain sibling, and their mean.

    The model is rebuilt from model.safetensors with plain library code: what is measured is exactly
    what users deploy. --json prints {"model", "id": {domain: top1}, "ood": {domain: top1}, "ood_avg"}.

    Examples:

      gmixout evaluate

      gmixout evaluate runs/my-run --ood painting,clipart --json
    """
    from gmixout_cli.config import DataConfig, build_saved_config
    from gmixout_cli.data import build_transform, load_domain, sibling_domains, verify_domain_data
    from gmixout_cli.eval import evaluate_domains, ood_sets
    from gmixout_cli.models import load_classifier
    from gmixout_cli.training import latest_run
    from gmixout_cli.utils.memory import resolve_device

    path = Path(target).expanduser() if target else latest_run()
    weights = path / "model.safetensors" if path.is_dir() else path
    if not weights.is_file():
        raise UserError(f"{weights} does not exist: give a run folder holding model.safetensors or a .safetensors file")
    model, meta = load_classifier(weights)
    cfg = build_saved_config(json.loads(meta["config"])) if "config" in meta else None
    data_cfg = cfg.data if cfg else DataConfig()
    if data:
        data_cfg.root = data
    if not data_cfg.root:
        raise UserError(f"{weights} does not say which data it was trained on: pass --data ROOT/DOMAIN")
    if ood is not None:
        data_cfg.ood = split_csv(ood)
    domain = load_domain(data_cfg)
    class_names = json.loads(meta["class_names"])
    if class_names != domain.classes:
        raise UserError(f"the model's classes {class_names} differ from {domain.domain}'s {domain.classes}: "
                        "evaluate on data with the same class folders")
    dev = resolve_device(device)
    model.to(dev)
    mean, std = json.loads(meta["mean"]), json.loads(meta["std"])
    transform = build_transform(int(meta["image_size"]), mean, std, train=False)
    log = err_console if as_json else console
    domain, _ = verify_domain_data(domain, data_cfg.unreadable, workers)
    ood_items, _ = ood_sets(domain, sibling_domains(domain, data_cfg.ood), data_cfg.unreadable, workers)
    scores = evaluate_domains(model, domain, ood_items, transform, batch_size, workers, dev,
                              on_domain=lambda d, a: log.print(f"  top-1 {d}: {a:.4f}"))
    name = cfg.model.name if cfg else f"{meta['library']}:{meta['arch']}"
    result = {"model": name, "weights": str(weights), **scores}
    if as_json:
        print(json.dumps(result))
        return
    console.print(scores_table(f"{name}  ({weights})", scores))
