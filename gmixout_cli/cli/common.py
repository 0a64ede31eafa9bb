"""Console objects and option helpers shared by the subcommands."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

console = Console()
err_console = Console(stderr=True)

OVERRIDES_HELP = "Recipe overrides as dotted key=value, e.g. [cyan]method.p=0.95 train.epochs=3[/]."
RECIPE_HELP = "Built-in recipe name ([cyan]gmixout recipes[/]) or a path to a YAML file. Default: gmixout."


def split_csv(value: str | None) -> list[str] | None:
    """'a,b' -> ['a', 'b']; None stays None."""
    if value is None:
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def scores_table(title: str, scores: dict) -> Table:
    """In-domain, per-domain out-of-domain and mean top-1 as a table."""
    table = Table(title=title)
    table.add_column("domain")
    table.add_column("split")
    table.add_column("top-1", justify="right")
    for name, acc in scores["id"].items():
        table.add_row(name, "in-domain (held out)", f"{acc:.4f}")
    for name, acc in scores["ood"].items():
        table.add_row(name, "out-of-domain", f"{acc:.4f}")
    if scores["ood_avg"] is not None:
        table.add_row("[bold]mean[/]", "out-of-domain", f"[bold]{scores['ood_avg']:.4f}[/]")
    return table
