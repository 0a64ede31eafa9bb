"""`gmixout profile`: will this recipe fit? A few real training steps, peak memory and throughput."""

from __future__ import annotations

import json

import typer
from rich.table import Table

from gmixout_cli.cli.common import OVERRIDES_HELP, RECIPE_HELP, console


def register(app: typer.Typer) -> None:
    app.command()(profile)


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def profile(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]...", show_default=False),
    recipe: str = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP, show_default=False),
    model: str = typer.Option(None, "--model", "-m", help="Shortcut for model.name.", show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="Shortcut for data.root (only its class count is used).",
                             show_default=False),
    steps: int = typer.Option(5, "--steps", min=1, help="Timed optimizer steps (after one warm-up step)."),
    budget: float = typer.Option(24.0, "--budget", min=0.1, help="Memory budget in GiB."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    predict: bool = typer.Option(False, "--predict", help="Predict the CUDA peak memory without running on a GPU "
                                 "(shapes only, any machine), side by side with full fine-tuning and LoRA r=8."),
) -> None:
    """Run a few real training steps of a recipe on this machine's device and check a memory budget.

    Peak memory is CUDA's max allocated on a GPU, the process's peak RSS on CPU, measured over the
    timed steps. Batches are random tensors of the recipe's shape (content changes neither time
    nor memory).

    Examples:

      gmixout profile --model vit_l14_clip train.batch_size=64 train.precision=bf16

      gmixout profile -r quickstart --budget 8

      gmixout profile --predict --model vit_l14_clip train.batch_size=64 train.precision=bf16

    With --predict nothing runs on a device: the training step runs on shape-only tensors and its peak
    CUDA memory is predicted by kind (weights, gradients, optimizer and method state, activations,
    transients), for the recipe's method and for full fine-tuning and LoRA r=8 at the same batch.
    """
    from gmixout_cli.config import load_config
    from gmixout_cli.profiling import profile as run_profile
    from gmixout_cli.utils.memory import oom_advice, oom_knobs

    cfg = load_config(recipe, overrides or [], {"model.name": model, "data.root": data})
    if predict:
        _predict(cfg, recipe, overrides or [], {"model.name": model, "data.root": data}, budget, as_json)
        return
    with oom_advice(cfg.train.batch_size, cfg.train.micro_batch_size):  # OOM while building the model
        report = run_profile(cfg, steps, budget)
    if as_json:
        print(json.dumps(report))
        return
    if report["oom"]:
        device_mem = report["device_memory_bytes"]
        on = f"this device's {_gib(device_mem)}" if device_mem else "this device's memory"
        console.print(f"[red]does not fit[/]: {report['model']} / {report['method']}, batch {report['batch_size']} x "
                      f"{report['image_size']} px ran out of {on} (budget {_gib(report['budget_bytes'])}): "
                      + oom_knobs(cfg.train.batch_size, cfg.train.micro_batch_size))
        return
    table = Table(title=f"profile: {report['model']} / {report['method']} on {report['device']}")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("batch x image size", f"{report['batch_size']} x {report['image_size']} px ({report['precision']})")
    table.add_row("step time", f"{report['step_time_s'] * 1000:.1f} ms")
    table.add_row("throughput", f"{report['images_per_s']:.1f} img/s")
    for key, value in report["state_bytes"].items():
        table.add_row(f"state: {key.replace('_', ' ')}", _gib(value))
    table.add_row("model state, total", _gib(report["state_total_bytes"]))
    table.add_row("model state of full fine-tuning", _gib(report["full_finetune_state_bytes"]))
    table.add_row("peak memory during the timed steps", _gib(report["steady_peak_bytes"]))
    table.add_row(f"peak memory ({report['peak_kind'].replace('_', ' ')})", _gib(report["peak_memory_bytes"]))
    if "process_baseline_bytes" in report:
        table.add_row("  of which the process before the model (libraries)", _gib(report["process_baseline_bytes"]))
    verdict = "[green]fits[/]" if report["fits"] else "[red]does not fit[/]"
    table.add_row("budget", f"{_gib(report['budget_bytes'])}: {verdict}")
    console.print(table)


def _predict(cfg, recipe: str | None, overrides: list[str], shortcuts: dict, budget: float,  # noqa: ANN001 - a Config
             as_json: bool) -> None:
    import dataclasses
    import warnings

    from gmixout_cli.config import load_config
    from gmixout_cli.config.schema import MethodConfig
    from gmixout_cli.data import load_domain
    from gmixout_cli.profiling.predict import predict

    classes = len(load_domain(cfg.data).classes) if cfg.data.root else 1000
    bf16_weights = getattr(cfg.method, "weight_dtype", "fp32") == "bf16"
    rows = {cfg.method.name + (" (bf16 weights)" if bf16_weights else ""): cfg}
    shared = {f"method.{f.name}" for f in dataclasses.fields(MethodConfig)}
    # the comparison rows keep the budget; the user's own method's fields (method.p, method.weight_dtype) are not theirs
    budget_only = [o for o in overrides if not o.startswith("method.") or o.partition("=")[0] in shared]
    for name, extra in (("full", ["method.name=full"]), ("lora r=8", ["method.name=lora", "method.r=8"])):
        if name.split()[0] != cfg.method.name:
            with warnings.catch_warnings():  # the recipe's own method fields are left out of the comparison rows
                warnings.simplefilter("ignore")
                rows[name] = load_config(recipe, [*budget_only, *extra], shortcuts)
    budget_bytes = int(budget * 1024**3)
    with console.status("predicting (the training step on shape-only tensors)"):
        results = {name: predict(c, classes, budget_bytes) for name, c in rows.items()}
    if as_json:
        print(json.dumps({"budget_bytes": budget_bytes, "predictions": results}))
        return
    first = next(iter(results.values()))
    ckpt = ", activation checkpointing" if first["grad_checkpointing"] else ""
    table = Table(title=f"predicted CUDA peak: {first['model']}, batch {first['batch_size']}, "
                        f"{first['precision']}{ckpt}")
    table.add_column("what")
    for name in results:
        table.add_column(name, justify="right")
    for key in first["breakdown"]:
        table.add_row(key.replace("_", " "), *(_gib(r["breakdown"][key]) for r in results.values()))
    table.add_row("[bold]peak (max allocated)[/]", *(f"[bold]{_gib(r['predicted_peak_bytes'])}[/]"
                                                     for r in results.values()))
    table.add_row("+ CUDA context, workspaces", *(_gib(r["context_bytes"]) for r in results.values()))
    table.add_row(f"budget {budget:g} GiB", *("[green]fits[/]" if r["fits"] else "[red]does not fit[/]"
                                              for r in results.values()))
    console.print(table)
    console.print("[dim]A prediction: each category at the moment of the step's peak (activations and transients "
                  "of bf16 autocast scaled from a fake-CUDA forward pass); validated on CPU against measured "
                  "tensor memory. Allocator fragmentation is not counted.[/]")
