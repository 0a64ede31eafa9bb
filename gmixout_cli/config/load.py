"""YAML recipe + `key=value` overrides -> validated `Config`, every problem reported at once."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, cast, get_args, get_origin

import yaml

from gmixout_cli.config.safe_yaml import MAX_BYTES, load_bounded
from gmixout_cli.config.schema import Config, MethodConfig
from gmixout_cli.errors import UserError


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Turn `["method.p=0.95", "data.ood=[a,b]"]` into a nested dict; values are YAML scalars."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise UserError(f"override '{item}' is not key=value: write it like method.p=0.95")
        try:
            value = load_bounded(raw, f"override '{key}'") if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise UserError(f"override '{item}' sets a field inside '{part}', which is not a section")
        node[parts[-1]] = value
    return out


def merge_dicts(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`."""
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge_dicts(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a recipe file with the safe loader; a clear error for malformed YAML."""
    try:
        if path.stat().st_size > MAX_BYTES:  # refused before reading a huge file into memory
            raise UserError(f"recipe {path} is {path.stat().st_size:,} bytes, more than a recipe can be "
                            f"({MAX_BYTES // 1024} KiB): check the path")
        text = path.read_text(errors="replace")
    except OSError as exc:
        raise UserError(f"cannot read recipe {path}: {exc.strerror}; check the path") from None
    try:
        data = load_bounded(text, f"recipe {path}")
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise UserError(f"recipe {path} is not valid YAML{where}: fix the syntax there") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (model:, data:, train:, method:)")
    return data


def build_config(raw: dict[str, Any]) -> Config:
    """Validate a nested dict into a `Config`; raises one UserError listing every problem."""
    problems: list[str] = []
    cfg = _build(Config, raw, "", problems)
    problems.extend(_check_values(cfg))  # fields with a bad type kept their default, so no double report
    if problems:
        detail = "; ".join(problems)
        raise UserError(f"invalid config ({len(problems)} problem{'s' * (len(problems) > 1)}): {detail}")
    return cfg


def build_saved_config(raw: dict[str, Any]) -> Config:
    """A config gmixout itself saved (a run's config.yaml, a model file's metadata). Versions before the
    per-method configs saved every method's fields; those the run's method does not read are dropped."""
    from gmixout_cli.methods.registry import method_names, unread_fields

    method = raw.get("method") if isinstance(raw, dict) else None
    if isinstance(method, dict) and method.get("name", MethodConfig.name) in method_names():
        unread = set(unread_fields(str(method.get("name", MethodConfig.name)), [str(k) for k in method]))
        raw = {**raw, "method": {k: v for k, v in method.items() if k not in unread}}
    return build_config(raw)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict of a config, for YAML and JSON."""
    return dataclasses.asdict(cfg)


def flatten_dict(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict as dotted keys (`train.lr`), the form overrides and config comparisons use."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(flatten_dict(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _build(cls: type, raw: Any, prefix: str, problems: list[str]) -> Any:
    if not isinstance(raw, dict):
        problems.append(f"'{prefix.rstrip('.') or 'recipe'}' must be a mapping, got {type(raw).__name__}")
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        name = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(fields)}"
            problems.append(f"unknown key '{name}' ({hint})")
            continue
        hint_type = hints[key]
        if cls is Config and key == "method":
            kwargs[key] = _build_method(value, problems)
        elif dataclasses.is_dataclass(hint_type):
            kwargs[key] = _build(cast(type, hint_type), value, f"{name}.", problems)
        else:
            ok, converted, expected = _coerce(value, hint_type)
            if ok:
                kwargs[key] = converted
            else:
                problems.append(f"'{name}' must be {expected}, got {value!r}")
    return cls(**kwargs)


def _build_method(raw: Any, problems: list[str]) -> MethodConfig:
    """The `method` section as the named method's own config; fields it does not read are refused."""
    from gmixout_cli.methods.registry import method_names, method_spec, readers

    if not isinstance(raw, dict):
        problems.append(f"'method' must be a mapping, got {type(raw).__name__}")
        raw = {}
    name = raw.get("name", MethodConfig.name)
    if name not in method_names():
        problems.append(f"'method.name' must be one of {'|'.join(method_names())}, got {name!r}")
        name = MethodConfig.name
    spec = method_spec(name)
    own = {f.name for f in dataclasses.fields(spec.config)}
    kept: dict[str, Any] = {}
    for key, value in raw.items():
        if key in spec.presets:
            if value != spec.presets[key]:
                fixed = " ".join(f"{k}={v}" for k, v in spec.presets.items())
                problems.append(f"'method.{key}' is fixed by method.name={name} ({fixed}): remove it, or use "
                                "a method that reads it")
        elif key in own:
            kept[key] = value
        elif readers(str(key)):
            problems.append(f"'method.{key}' has no effect with method.name={name} (read by "
                            f"{', '.join(readers(str(key)))}): remove it or choose one of those methods")
        else:
            close = difflib.get_close_matches(str(key), sorted(own), n=1)
            hint = f"did you mean 'method.{close[0]}'?" if close else f"valid keys: {', '.join(sorted(own))}"
            problems.append(f"unknown key 'method.{key}' ({hint})")
    method = _build(spec.config, kept, "method.", problems)
    method = dataclasses.replace(method, **spec.presets)
    problems.extend(method.problems())
    return method


def _coerce(value: Any, tp: Any) -> tuple[bool, Any, str]:
    """Check `value` against a type hint; returns (ok, converted value, description of the type)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return True, None, ""
        descriptions = []
        for arg in args:
            if arg is type(None):
                descriptions.append("null")
                continue
            ok, converted, desc = _coerce(value, arg)
            if ok:
                return True, converted, ""
            descriptions.append(desc)
        return False, None, " or ".join(descriptions)
    if origin is Literal:
        choices = get_args(tp)
        return value in choices, value, "one of " + "|".join(str(c) for c in choices)
    if origin is list:
        (item_tp,) = get_args(tp)
        if isinstance(value, str):  # `data.ood=painting,clipart` on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            return False, None, f"a list of {item_tp.__name__}"
        converted = []
        for item in value:
            ok, conv, _ = _coerce(item, item_tp)
            if not ok:
                return False, None, f"a list of {item_tp.__name__}"
            converted.append(conv)
        return True, converted, ""
    if tp is bool:
        return isinstance(value, bool), value, "true or false"
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok, value, "an integer"
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-3` (no dot) as a string; users write it anyway
            try:
                value = float(value)
            except ValueError:
                return False, None, "a number"
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return ok, float(value) if ok else None, "a number"
    if tp is str:
        ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)
        return ok, str(value) if ok else None, "a string"
    return isinstance(value, tp), value, tp.__name__


def _check_values(cfg: Config) -> list[str]:
    """Range and consistency checks that types cannot express."""
    p: list[str] = []
    t, d = cfg.train, cfg.data
    for name, value in (("train.epochs", t.epochs), ("train.batch_size", t.batch_size),
                        ("train.log_every", t.log_every),
                        ("train.eval_batch_size", t.eval_batch_size)):
        if value < 1:
            p.append(f"'{name}' must be >= 1, got {value}")
    if t.micro_batch_size is not None and (t.micro_batch_size < 1 or t.batch_size % t.micro_batch_size):
        p.append(f"'train.micro_batch_size' must divide train.batch_size={t.batch_size}, got {t.micro_batch_size}")
    if t.checkpoint_every is not None and t.checkpoint_every < 1:
        p.append(f"'train.checkpoint_every' must be >= 1 or null, got {t.checkpoint_every}")
    if t.max_steps is not None and t.max_steps < 1:
        p.append(f"'train.max_steps' must be >= 1 or null, got {t.max_steps}")
    for name, rate in (("train.lr", t.lr), ("train.head_lr", t.head_lr)):
        if rate is not None and not 0.0 <= rate < 1.0:
            p.append(f"'{name}' must be in [0, 1), got {rate}")
    if t.weight_decay < 0:
        p.append(f"'train.weight_decay' must be >= 0, got {t.weight_decay}")
    if t.warmup_steps < 0:
        p.append(f"'train.warmup_steps' must be >= 0, got {t.warmup_steps}")
    if t.grad_clip is not None and t.grad_clip <= 0:
        p.append(f"'train.grad_clip' must be > 0 or null, got {t.grad_clip}")
    if d.image_size is not None and not 16 <= d.image_size <= 2048:
        p.append(f"'data.image_size' must be between 16 and 2048, got {d.image_size}")
    if not 0.0 < d.val_fraction < 1.0:
        p.append(f"'data.val_fraction' must be in (0, 1), got {d.val_fraction}")
    if len(d.crop_scale) != 2 or not 0.0 < d.crop_scale[0] <= d.crop_scale[1] <= 1.0:
        p.append(f"'data.crop_scale' must be [min, max] with 0 < min <= max <= 1, got {d.crop_scale}")
    if d.num_workers < 0:
        p.append(f"'data.num_workers' must be >= 0, got {d.num_workers}")
    from gmixout_cli.methods.registry import method_spec

    head = method_spec(cfg.method.name).head_init
    if head and cfg.model.head_init not in ("auto", head):
        p.append(f"method.name={cfg.method.name} starts from a {head} head: "
                 f"set model.head_init=auto, got {cfg.model.head_init}")
    if cfg.model.weights not in ("pretrained", "random") and not cfg.model.weights.strip():
        p.append("'model.weights' is empty: use pretrained, random, or a path to a weight file")
    return p
