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
) -> None:
    """Run a few real training steps of a recipe on this machine's device and check a memory budget.

    Peak memory is CUDA's max allocated on a GPU, the process's peak RSS on CPU, measured over the
    timed steps. Batches are random tensors of the recipe's shape (content changes neither time
    nor memory).

    Examples:

      gmixout profile --model vit_l14_clip train.batch_size=64 train.precision=bf16

      gmixout profile -r quickstart --budget 8
    """
    from gmixout_cli.config import load_config
    from gmixout_cli.profiling import profile as run_profile
    from gmixout_cli.utils.memory import oom_advice, oom_knobs

    cfg = load_config(recipe, overrides or [], {"model.name": model, "data.root": data})
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
