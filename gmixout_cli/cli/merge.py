"""`gmixout merge`: WiSE-FT (with an alpha sweep), uniform and greedy soups, MonoSoup."""

from __future__ import annotations

from pathlib import Path

import typer

from gmixout_cli.cli.common import console
from gmixout_cli.errors import UserError

METHODS = ("wise", "uniform", "greedy", "monosoup")


def register(app: typer.Typer) -> None:
    app.command()(merge)


def _weights(source: str) -> tuple[Path, Path | None]:
    path = Path(source).expanduser()
    return (path / "model.safetensors", path) if path.is_dir() else (path, None)


def merge(
    sources: list[str] = typer.Argument(None, help="Run folders or .safetensors files (default: the latest run); "
                                        "soups take several.", show_default=False),
    method: str = typer.Option("wise", "--method", "-m", help="wise (WiSE-FT), uniform or greedy (soups), monosoup."),
    alpha: str = typer.Option("0.5", "--alpha", "-a", help="WiSE-FT weight of the fine-tuned model, or a comma "
                              "list to sweep: the best on the held-out split is written."),
    base: str = typer.Option(None, "--base", help="The zero-shot / initial end for wise and monosoup (.safetensors). "
                             "Default: the run's own starting point, rebuilt from its config.", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output file (default: beside the first source).",
                            show_default=False),
) -> None:
    """Merge fine-tuned weights into one plain dense safetensors file (same names and metadata as a run's).

    wise: (1-alpha)*initial + alpha*fine-tuned on every floating tensor; several alphas are scored on the
    run's held-out split and the best is kept. uniform: the mean of several runs. greedy: runs sorted by
    held-out accuracy, each added only if the soup's held-out accuracy improves. monosoup: each matrix
    update split into its dominant spectral part and the rest, reweighted (docs/METHOD.md).

    Examples:

      gmixout merge runs/my-run --alpha 0.5

      gmixout merge runs/my-run --alpha 0,0.2,0.4,0.6,0.8,1

      gmixout merge runs/seed0 runs/seed1 runs/seed2 --method greedy --out soup.safetensors
    """
    from gmixout_cli.merge import check_compatible, initial_state, interpolate, load_weights, save_merged
    from gmixout_cli.merge.select import val_scorer
    from gmixout_cli.merge.soups import greedy_soup, monosoup, uniform_soup
    from gmixout_cli.training import latest_run

    if method not in METHODS:
        raise UserError(f"unknown merge method '{method}': choose one of {', '.join(METHODS)}")
    try:
        alphas = [float(a) for a in alpha.split(",") if a.strip()]
    except ValueError:
        raise UserError(f"--alpha {alpha!r} is not a number or a comma list of numbers: e.g. --alpha 0.5") from None
    if not alphas or any(not 0.0 <= a <= 1.0 for a in alphas):
        raise UserError(f"--alpha values must be in [0, 1], got {alpha}")
    paths = [_weights(s) for s in (sources or [str(latest_run())])]
    loaded = [load_weights(w) for w, _ in paths]
    (first, run_dir), (tuned, meta) = paths[0], loaded[0]
    for (w, _), (state, m) in zip(paths[1:], loaded[1:], strict=True):
        check_compatible(tuned, meta, state, m, str(first), str(w))
    if method in ("uniform", "greedy") and len(paths) < 2:
        raise UserError(f"a {method} soup needs at least two runs: give several run folders or files")
    if method in ("wise", "monosoup") and len(paths) > 1:
        raise UserError(f"{method} merges one fine-tuned model with its start: give one run (use --base for the other)")

    if method in ("wise", "monosoup"):
        if base:
            base_state, base_meta = load_weights(Path(base).expanduser())
        elif run_dir is None:
            raise UserError(f"{first} is a bare file: pass --base PATH to the model to merge with")
        else:
            console.print("rebuilding the run's starting point from its config (pretrained weights + initial head)")
            base_state, base_meta = initial_state(run_dir, meta), meta
        check_compatible(tuned, meta, base_state, base_meta, str(first), base or "the run's starting point")
    if method == "wise":
        candidates = {a: interpolate(base_state, tuned, a) for a in alphas}
        info: dict = {"kind": "wise-ft", "base": base or "initial", "fine_tuned": str(first)}
        if len(alphas) > 1:
            score = val_scorer(first, meta)
            scores = {a: score(s) for a, s in candidates.items()}
            for a, s in scores.items():
                console.print(f"  alpha {a:.2f}: held-out top-1 {s:.4f}")
            chosen = max(scores, key=lambda a: (scores[a], a))
            info["held_out_top1"] = {str(a): s for a, s in scores.items()}
        else:
            chosen = alphas[0]
        info["alpha"] = chosen
        merged, name = candidates[chosen], f"wise_alpha{chosen:.2f}.safetensors"
    elif method == "monosoup":
        merged, name, info = monosoup(base_state, tuned), "monosoup.safetensors", {"kind": "monosoup"}
    else:
        states = [s for s, _ in loaded]
        if method == "uniform":
            merged, chosen_runs = uniform_soup(states), list(range(len(states)))
        else:
            score = val_scorer(first, meta)
            merged, chosen_runs = greedy_soup(states, [score(s) for s in states], score)
        name = f"{method}_soup.safetensors"
        info = {"kind": f"{method}-soup", "ingredients": [str(paths[i][0]) for i in chosen_runs]}
    target = Path(out).expanduser() if out else first.parent / name
    save_merged(target, merged, meta, info)
    console.print(f"[bold]wrote[/] {target} ({info['kind']}" + (f", alpha={info['alpha']}" if "alpha" in info else "")
                  + (f", {len(info['ingredients'])} ingredients" if "ingredients" in info else "") + ")")
