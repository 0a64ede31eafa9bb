"""Finding built-in recipes and turning a recipe plus overrides into a `Config`."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path
from typing import Any

from gmixout_cli.config.load import build_config, merge_dicts, parse_overrides, read_yaml
from gmixout_cli.config.schema import Config, MethodConfig
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
    from gmixout_cli.methods.registry import method_names, method_spec, readers, unread_fields

    raw = read_yaml(resolve_recipe(recipe or DEFAULT_RECIPE))
    for key, value in (shortcuts or {}).items():
        if value is not None:  # flags such as --data are taken verbatim, never YAML-parsed
            section, _, field = key.partition(".")
            raw = merge_dicts(raw, {section: {field: value}})
    update = parse_overrides(overrides)
    update_section, recipe_section = update.get("method"), raw.get("method")
    given: dict[str, Any] = update_section if isinstance(update_section, dict) else {}
    recipe_method: dict[str, Any] | None = recipe_section if isinstance(recipe_section, dict) else None
    name = given.get("name", (recipe_method or {}).get("name", MethodConfig.name))
    if name not in method_names():
        return build_config(merge_dicts(raw, update))  # reports the unknown name with the choices
    if recipe_method is not None and name != recipe_method.get("name", MethodConfig.name):
        raw = {**raw, "method": _for_method(recipe_method, name)}
    other = "episodes" if "k" in given else "k"
    if recipe_method is not None and ("k" in given) != ("episodes" in given) and other not in method_spec(name).presets:
        # k and episodes are two ways to say one thing: the one given on the command line replaces the recipe's
        raw = merge_dicts(raw, {"method": {other: None}})
    unread = unread_fields(name, [str(f) for f in given if f != "name"])
    if unread:
        who = sorted({n for f in unread for n in readers(f)})
        values = " ".join(f"method.{f}={given[f]}" for f in unread)
        verb = "has" if len(unread) == 1 else "have"
        where = f" (read by {', '.join(who)})" if who else ""
        raise UserError(f"{values} {verb} no effect with method.name={name}{where}: remove it or choose "
                        f"{'one of those methods' if who else 'a method that reads it'}")
    return build_config(merge_dicts(raw, update))


def _for_method(recipe_method: dict[str, Any], name: str) -> dict[str, Any]:
    """The recipe's method section when the command line picks another method: its fields carry over only to
    a method of the same engine (gmixout -> randmask, lora -> dora), where they mean the same."""
    from gmixout_cli.methods.registry import METHODS

    old = METHODS.get(str(recipe_method.get("name", MethodConfig.name)))
    new = METHODS[name]
    common = {f.name for f in dataclasses.fields(MethodConfig)}
    same_engine = old is not None and old.config is new.config
    kept = {k: v for k, v in recipe_method.items()
            if k in common or (same_engine and k not in new.presets)}
    dropped = sorted(str(k) for k in recipe_method if k not in kept and k not in new.presets)  # presets: asked for
    if dropped:
        warnings.warn(f"method.name={name}: the recipe's {', '.join(dropped)} belong to its "
                      f"{recipe_method.get('name', MethodConfig.name)} settings and are left out "
                      f"({name} uses its own defaults; set any of its fields as method.KEY=VALUE)", stacklevel=3)
    return {**kept, "name": name}
