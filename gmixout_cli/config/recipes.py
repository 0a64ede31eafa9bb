"""Finding built-in recipes and turning a recipe plus overrides into a `Config`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gmixout_cli.config.load import build_config, merge_dicts, parse_overrides, read_yaml
from gmixout_cli.config.schema import METHOD_FIELDS, Config, unused_method_fields
from gmixout_cli.errors import UserError

DEFAULT_RECIPE = "gmixout"


def recipes_dir() -> Path:
    """The built-in recipes: the repository's recipes/ in a checkout, the packaged copy in a wheel."""
    checkout = Path(__file__).resolve().parents[2] / "recipes"
    if checkout.is_dir():
        return checkout
    from importlib.resources import files

    return Path(str(files("gmixout_cli.recipes")))


def list_recipes() -> dict[str, Path]:
    """Name -> path of every built-in recipe."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def resolve_recipe(name_or_path: str) -> Path:
    """A built-in recipe name or a path to a YAML file."""
    path = Path(name_or_path).expanduser()
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise UserError(f"recipe file {path} does not exist: check the path or run `gmixout recipes`")
        return path
    builtin = list_recipes()
    if name_or_path in builtin:
        return builtin[name_or_path]
    raise UserError(f"unknown recipe '{name_or_path}': run `gmixout recipes` for the built-in names, "
                    "or give a .yaml path")


def load_config(recipe: str | None, overrides: list[str], shortcuts: dict[str, Any] | None = None) -> Config:
    """Recipe (default: the built-in `gmixout`) <- shortcut flags <- `key=value` overrides -> Config."""
    raw = read_yaml(resolve_recipe(recipe or DEFAULT_RECIPE))
    for key, value in (shortcuts or {}).items():
        if value is not None:  # flags such as --data are taken verbatim, never YAML-parsed
            section, _, field = key.partition(".")
            raw = merge_dicts(raw, {section: {field: value}})
    update = parse_overrides(overrides)
    method = update.get("method")
    if isinstance(method, dict) and isinstance(raw.get("method"), dict) and ("k" in method) != ("episodes" in method):
        # k and episodes are two ways to say one thing: the one given on the command line replaces the recipe's
        raw = merge_dicts(raw, {"method": {"episodes" if "k" in method else "k": None}})
    cfg = build_config(merge_dicts(raw, update))
    unused = unused_method_fields(cfg.method.name, list(method) if isinstance(method, dict) else [])
    if unused:
        readers = sorted({n for n, fields in METHOD_FIELDS.items() if set(unused) & fields})
        given = " ".join(f"method.{f}={method[f]}" for f in unused)
        verb = "has" if len(unused) == 1 else "have"
        raise UserError(f"{given} {verb} no effect with method.name={cfg.method.name} (read by "
                        f"{', '.join(readers)}): remove it or choose one of those methods")
    return cfg
