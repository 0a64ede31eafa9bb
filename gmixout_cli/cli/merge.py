"""`gmixout merge`: WiSE-FT interpolation between a run's starting point and its fine-tuned weights."""

from __future__ import annotations

from pathlib import Path

import typer

from gmixout_cli.cli.common import console
from gmixout_cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command()(merge)


def merge(
    source: str = typer.Argument(None, help="Run folder or fine-tuned .safetensors (default: the latest run).",
                                 show_default=False),
    alpha: float = typer.Option(0.5, "--alpha", "-a", min=0.0, max=1.0,
                                help="Weight of the fine-tuned model: (1-alpha)*initial + alpha*fine-tuned."),
    base: str = typer.Option(None, "--base", help="The other end (.safetensors). Default: the run's own starting "
                             "point (pretrained backbone + initial head, rebuilt from its config).", show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Output file (default: wise_alpha<A>.safetensors beside the "
                            "source).", show_default=False),
) -> None:
    """WiSE-FT: merge fine-tuned and zero-shot / initial weights into one plain dense safetensors file.

    Every floating tensor is interpolated; the result loads like model.safetensors (same names and
    metadata), so `gmixout evaluate FILE` and plain library code read it.

    Examples:

      gmixout merge runs/my-run --alpha 0.5

      gmixout merge tuned.safetensors --base zeroshot.safetensors --alpha 0.3 --out mix.safetensors
    """
    from gmixout_cli.merge import check_compatible, initial_state, interpolate, load_weights, save_merged
    from gmixout_cli.training import latest_run

    path = Path(source).expanduser() if source else latest_run()
    weights = path / "model.safetensors" if path.is_dir() else path
    tuned, meta = load_weights(weights)
    if base:
        base_state, base_meta = load_weights(Path(base).expanduser())
        check_compatible(tuned, meta, base_state, base_meta, str(weights), base)
    else:
        if not path.is_dir():
            raise UserError(f"{weights} is a bare file: pass --base PATH to the model to interpolate with")
        console.print("rebuilding the run's starting point from its config (pretrained weights + initial head)")
        base_state = initial_state(path, meta)
        check_compatible(tuned, meta, base_state, meta, str(weights), "the run's starting point")
    target = Path(out).expanduser() if out else weights.parent / f"wise_alpha{alpha:.2f}.safetensors"
    save_merged(target, interpolate(base_state, tuned, alpha), meta,
                {"kind": "wise-ft", "alpha": alpha, "fine_tuned": str(weights), "base": base or "initial"})
    console.print(f"[bold]wrote[/] {target} (WiSE-FT, alpha={alpha})")
