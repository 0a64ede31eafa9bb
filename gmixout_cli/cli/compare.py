"""`gmixout compare`: several methods on one domain, learning rates chosen on held-out data, several seeds."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from gmixout_cli.cli.common import OVERRIDES_HELP, RECIPE_HELP, console, split_csv
from gmixout_cli.errors import UserError

DEFAULT_METHODS = "full,lp,lpft,lora,mixout,randmask,gmixout"


def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=True)(compare)


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(v) for v in split_csv(text) or []]
    except ValueError:
        raise UserError(f"{what} '{text}' is not a comma-separated list of numbers: write it like 1e-5,3e-5,1e-4") \
            from None


def compare(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP + " They apply to every row (the shared budget).",
                                          metavar="[KEY=VALUE]...", show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="ROOT/DOMAIN to train on; its siblings are the "
                             "out-of-domain test sets.", show_default=False),
    recipe: str = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP + " Every row starts from it.",
                               show_default=False),
    model: str = typer.Option(None, "--model", "-m", help="Shortcut for model.name.", show_default=False),
    methods: str = typer.Option(DEFAULT_METHODS, "--methods", help="Comma-separated method names, one row each "
                                "([cyan]gmixout methods[/]); empty with --variant for variants only."),
    variant: list[str] = typer.Option(None, "--variant", help="An extra row: 'LABEL:key=value ...' with a "
                                      "method.name, e.g. 'full_update_bn:method.name=full method.norm_stats=update' "
                                      "(repeatable).", show_default=False),
    seeds: str = typer.Option("0,1,2", "--seeds", help="Comma-separated seeds; the first one runs the grids."),
    grid: list[str] = typer.Option(None, "--grid", help="A row's learning-rate grid, 'LABEL=V1,V2,V3' (at least "
                                   "two values, three to bracket the best; default: three points of the 1-3-10 "
                                   "series around the recipe's rate, scaled per method). Repeatable.",
                                   show_default=False),
    family: list[str] = typer.Option(None, "--family", help="Rows that are one method's own levers, "
                                     "'NAME=ROW1,ROW2' (e.g. gmixout=gmixout,gmixout_filter): the one with the best "
                                     "held-out score at the first seed stands for NAME and alone runs the other "
                                     "seeds. Repeatable.", show_default=False),
    max_extensions: int = typer.Option(3, "--max-extensions", min=0, help="How often a grid may grow past an "
                                       "edge where its best value lies."),
    wise: str = typer.Option(None, "--wise", help="Rows whose kept runs get a WiSE-FT curve (comma-separated; "
                             "empty for none; on a --family member, WiSE-FT follows the member the family "
                             "chooses). Default: lpft and gmixout, where they are rows.", show_default=False),
    alphas: str = typer.Option("0,0.25,0.5,0.75,1", "--alphas", help="WiSE-FT mixing weights."),
    id_test: str = typer.Option(None, "--id-test", help="Sibling domains drawn from the training distribution "
                                "(e.g. a clean test set beside corrupted copies): reported as in-distribution "
                                "test accuracy and left out of the OOD mean (comma-separated).", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Comparison folder (default: compare/<domain>-<model>); "
                            "running the same command again continues it.", show_default=False),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan and its estimated time (a few timed "
                                 "steps per method on this machine), train nothing."),
) -> None:
    """Compare methods on one domain: in-domain and out-of-domain top-1, mean ± std over seeds.

    Every row trains with the same recipe and budget through the same training loop as
    [cyan]gmixout finetune[/]; only its method (and its learning rate) differ. Each row's learning rate is
    chosen on the training domain's held-out split at the first seed, from a grid that grows past an
    edge while the best value lies there; the other seeds then run at that value. Out-of-domain data
    never selects anything. Writes compare.json, compare.md (the table) and compare.png (ID vs OOD,
    WiSE-FT as curves) to --out, after every run.

    Examples:

      gmixout compare -d ./pacs/sketch -r gmixout_efficientnet_lite0 --dry-run

      gmixout compare -d ./pacs/sketch --methods full,lp,gmixout --seeds 0,1 --grid gmixout=1e-5,3e-5,1e-4

      gmixout compare -d ./pacs/art_painting --variant 'full_update_bn:method.name=full method.norm_stats=update'
    """
    from gmixout_cli.compare import Comparison, build_plan, write_report
    from gmixout_cli.compare.progress import clock

    if not data:
        raise UserError("no training data: pass --data ROOT/DOMAIN (its sibling folders are the test domains)")
    shared = [f"data.root={data}", *([f"model.name={model}"] if model else []), *(overrides or [])]
    grids: dict[str, list[float]] = {}
    for g in grid or []:
        label, sep, values = g.partition("=")
        if not sep:
            raise UserError(f"--grid '{g}' is not LABEL=V1,V2,V3: write it like gmixout=1e-5,3e-5,1e-4")
        grids[label.strip()] = _floats(values, f"--grid {label}")
    families: dict[str, list[str]] = {}
    for f in family or []:
        name, sep, members = f.partition("=")
        if not sep or not name.strip():
            raise UserError(f"--family '{f}' is not NAME=ROW1,ROW2: write it like gmixout=gmixout,gmixout_filter")
        families[name.strip()] = split_csv(members) or []
    seed_list = [int(v) for v in _floats(seeds, "--seeds")]
    rows = (split_csv(methods) or []) + [v.partition(":")[0].strip() for v in variant or []]
    wise_rows = [r for r in ("lpft", "gmixout") if r in rows] if wise is None else split_csv(wise) or []
    plan = build_plan(recipe, shared, split_csv(methods) or [], variant or [], grids, seed_list,
                      wise_rows, _floats(alphas, "--alphas"), max_extensions, split_csv(id_test), families)
    first = plan.config(plan.rows[0], plan.rows[0].grid[0], seed_list[0])
    if plan.id_test:
        from gmixout_cli.data import load_domain, sibling_domains

        siblings = sibling_domains(load_domain(first.data), first.data.ood)
        unknown = [d for d in plan.id_test if d not in siblings]
        if unknown:
            raise UserError(f"--id-test names '{unknown[0]}', which is not a test domain of this comparison: "
                            f"choose from {', '.join(siblings)}")
    folder = Path(out).expanduser() if out else Path("compare") / (
        f"{Path(first.data.root).name}-{first.model.name.replace(':', '-').replace('/', '-')}")
    for note in plan.notes:
        console.print(f"[dim]note: {note}[/]")

    def report(state: dict) -> None:
        write_report(folder, state, f"{Path(first.data.root).name} ({first.model.name}): {len(plan.seeds)} seeds")

    comparison = Comparison(plan, folder, console, report)
    if dry_run:
        _print_plan(comparison, folder)
        return
    from gmixout_cli.training.runs import claim

    console.print(f"[bold]compare[/] {len(plan.rows)} rows x {len(plan.seeds)} seeds in {folder}; "
                  f"{comparison.steps} steps per run")
    with claim(folder):
        state = comparison.run()
    console.print(f"[bold]wrote[/] {folder / 'compare.md'}, compare.json, compare.png "
                  f"({clock(state['elapsed_s'])} in this process)")
    console.print((folder / "compare.md").read_text(), markup=False, highlight=False, soft_wrap=True)


def _print_plan(comparison, folder: Path) -> None:  # noqa: ANN001 - a Comparison
    from gmixout_cli.compare.estimate import estimate, measured_step_s
    from gmixout_cli.compare.progress import clock

    plan = comparison.plan

    def later_seeds(row) -> int:  # noqa: ANN001 - a Row; a family's chosen member alone runs them (counted once)
        return len(plan.seeds) - 1 if comparison.runs_every_seed(row.label) else 0

    todo = comparison.todo()
    pending = {r.label: sum(not comparison.finished(row, key) for row, key in todo if row.label == r.label)
               for r in plan.rows}
    measured = measured_step_s(folder / "runs")
    seconds = estimate(plan, comparison.steps, pending, measured)
    table = Table(title=f"gmixout compare: the plan ({folder})")
    for col in ("row", "overrides", "tuned", "grid", "runs", "to run", "estimate"):
        table.add_column(col)
    for r in plan.rows:
        runs = len(r.grid) + later_seeds(r)
        table.add_row(r.label, " ".join(r.overrides), r.key, ", ".join(f"{v:g}" for v in r.grid), str(runs),
                      str(pending[r.label]), clock(seconds[r.label]))
    console.print(table)
    console.print(f"seeds {plan.seeds}; {comparison.steps} optimizer steps per run; WiSE-FT on "
                  f"{', '.join(plan.wise) or 'no row'} at alphas {plan.alphas}"
                  + "".join(f"; family {k}: {', '.join(v)} (the member chosen on held-out runs the later seeds)"
                            for k, v in plan.families.items()))
    pace = f"the pace of this comparison's finished {', '.join(sorted(measured))} runs, else timed steps" \
        if measured else "timed steps"
    console.print(f"[bold]estimated time[/] {clock(sum(seconds.values()))} on this machine ({pace}; a grid "
                  f"that grows past an edge adds a run each time, at most {plan.max_extensions} per row)")
