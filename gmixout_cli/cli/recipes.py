"""`gmixout recipes`, `gmixout cp` and `gmixout models`: what is built in, and copies to edit."""

from __future__ import annotations

import shutil
from pathlib import Path

import typer
from rich.table import Table

from gmixout_cli.cli.common import console
from gmixout_cli.errors import UserError


def register(app: typer.Typer) -> None:
    app.command("recipes")(list_recipes_cmd)
    app.command("cp")(copy_recipe)
    app.command("models")(list_models_cmd)
    app.command("methods")(list_methods_cmd)


def _description(path: Path) -> str:
    first = path.read_text().splitlines()[:1]
    return first[0].lstrip("# ").strip() if first and first[0].startswith("#") else ""


def list_recipes_cmd() -> None:
    """List the built-in recipes (use one with --recipe NAME, copy one with gmixout cp)."""
    from gmixout_cli.config import list_recipes

    table = Table(title="built-in recipes")
    table.add_column("name")
    table.add_column("description")
    for name, path in list_recipes().items():
        table.add_row(name, _description(path))
    console.print(table)


def copy_recipe(
    recipe: str = typer.Argument(..., help="Built-in recipe name."),
    dest: str = typer.Argument(..., help="Destination file or folder."),
) -> None:
    """Copy a built-in recipe out for editing; then run it with --recipe PATH."""
    from gmixout_cli.config import resolve_recipe

    src = resolve_recipe(recipe)
    target = Path(dest).expanduser()
    if target.is_dir():
        target = target / src.name
    if target.exists():
        raise UserError(f"{target} already exists: choose another destination or remove it")
    if not target.parent.is_dir():
        raise UserError(f"folder {target.parent} does not exist: create it first")
    shutil.copyfile(src, target)
    console.print(f"copied {recipe} to {target}; run it with: gmixout finetune --recipe {target}")


def list_models_cmd() -> None:
    """List the model registry (also: timm:<name> and open_clip:<arch>:<tag>)."""
    from gmixout_cli.models import list_models

    table = Table(title="models")
    table.add_column("name")
    table.add_column("description")
    for name, desc in list_models().items():
        table.add_row(name, desc)
    console.print(table)


def list_methods_cmd() -> None:
    """List the fine-tuning methods (method.name) with the method.* fields each reads and their defaults."""
    import dataclasses

    from gmixout_cli.config.schema import MethodConfig
    from gmixout_cli.methods.registry import method_names, method_spec

    common = {f.name for f in dataclasses.fields(MethodConfig)}
    table = Table(title="methods (every one also reads method.norm_stats)")
    table.add_column("method.name")
    table.add_column("what trains")
    table.add_column("method.* fields (defaults)")
    for name in method_names():
        spec = method_spec(name)
        fields = [f"{f.name}={f.default}" for f in dataclasses.fields(spec.config)
                  if f.name not in common and f.name not in spec.presets]
        fixed = [f"{k}={v} (fixed)" for k, v in spec.presets.items()]
        head = [f"head: {spec.head_init}"] if spec.head_init else []
        table.add_row(name, spec.summary, ", ".join(fields + fixed + head) or "-")
    console.print(table)
