"""What a comparison runs: methods (rows), their learning-rate grids, seeds, one shared budget.

Protocol: each row's grid runs at the first seed and the value with the best held-out in-domain top-1
is kept (a plateau of equal scores: its middle value); while that value sits at an edge of the grid the
grid grows past it, one value at a time. The other seeds then run at the kept value. Only the training domain's
held-out split selects anything; out-of-domain scores are measured, never used.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gmixout_cli.config import Config, build_config, config_to_dict, flatten_dict, load_config, parse_overrides
from gmixout_cli.errors import UserError
from gmixout_cli.methods.registry import method_model_config, method_names, method_spec
from gmixout_cli.training.checkpoint import RESUME_SETTABLE

# Keys that make the budget or the data: set once for the whole comparison, never per row.
SHARED_PREFIXES = ("data.", "train.epochs", "train.max_steps", "train.batch_size", "train.micro_batch_size",
                   "train.seed", "train.precision", "model.name", "model.weights")
# A linear probe starts from the model's own head (a fitted probe, or CLIP's zero-shot head) whatever head the
# recipe gives the fine-tuning methods: training a head from zero is not the baseline people compare against.
ROW_DEFAULTS: dict[str, tuple[str, ...]] = {"lp": ("model.head_init=auto",)}
# Keys that differ between machines and change results by float rounding only: a run trained elsewhere still
# counts (the device too, which a resume, continuing one machine's RNG state, may not switch; the batches' memory
# layout, so runs from before it was a setting still count). Rounding compounds over a run as a seed does.
MACHINE_KEYS = (*RESUME_SETTABLE, "train.device", "model.memory_format")


@dataclass(frozen=True)
class Row:
    """One row of the comparison: a method with its own overrides and learning-rate grid."""

    label: str
    overrides: tuple[str, ...]
    key: str  # the tuned learning rate: train.lr, or train.head_lr for the linear probe
    grid: tuple[float, ...]

    @property
    def method(self) -> str:
        return str(parse_overrides(list(self.overrides))["method"]["name"])


@dataclass(frozen=True)
class RunKey:
    label: str
    value: float
    seed: int

    def folder(self, key: str) -> str:
        return f"{self.label}/{key.rsplit('.', 1)[-1]}{self.value:g}-s{self.seed}"


@dataclass
class Plan:
    """A comparison: recipe + shared overrides, its rows, seeds, WiSE-FT rows and alphas."""

    recipe: str | None
    shared: list[str]
    rows: list[Row]
    seeds: list[int]
    wise: list[str] = field(default_factory=list)
    alphas: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    max_extensions: int = 3
    notes: list[str] = field(default_factory=list)
    # sibling domains drawn from the training distribution (a clean test set beside corrupted ones): reported
    # as in-distribution test accuracy, left out of the out-of-domain mean
    id_test: list[str] = field(default_factory=list)
    # a method's own levers as rows of one family (GMixout with entry and filter masks, say): the member with
    # the best held-out score at the first seed stands for the family and alone runs the other seeds
    families: dict[str, list[str]] = field(default_factory=dict)

    def row(self, label: str) -> Row:
        return next(r for r in self.rows if r.label == label)

    def gets_wise(self, label: str) -> bool:
        """Whether a row's kept runs get WiSE-FT curves: a --wise row, or a member of its family (the member chosen
        on held-out data stands for the method, so WiSE-FT on the method follows it to every seed)."""
        return label in self.wise or any(label in members and not set(members).isdisjoint(self.wise)
                                         for members in self.families.values())

    def config(self, row: Row, value: float, seed: int) -> Config:
        """The resolved config of one run."""
        return self.load(row.label, [*row.overrides, f"{row.key}={value!r}", f"train.seed={seed}"])

    def load(self, label: str, overrides: list[str]) -> Config:
        """The recipe with the shared and the given overrides; its warnings become notes, said once."""
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                cfg = load_config(self.recipe, [*self.shared, *overrides])
            except UserError as exc:
                raise UserError(f"row {label}: {exc}") from None
        for w in caught:  # e.g. the recipe's GMixout fields left out for another method
            note = f"{label}: {w.message}"
            if note not in self.notes:
                self.notes.append(note)
        return cfg


def snap(value: float) -> float:
    """Two significant digits, so grids print and name folders cleanly."""
    return float(f"{value:.2g}")


def series_grid(centre: float) -> list[float]:
    """Three points of the 1-3-10 series around `centre`: 1e-4 -> [3e-5, 1e-4, 3e-4]."""
    n = round(2 * math.log10(centre))
    return [series_value(i) for i in (n - 1, n, n + 1)]


def series_value(n: int) -> float:
    """The n-th half decade of the 1-3-10 series: 10^(n/2) rounded to 1 or 3 times a power of ten."""
    return snap((1.0 if n % 2 == 0 else 3.0) * 10.0 ** (n // 2))


def extend(grid: list[float], upward: bool) -> float:
    """The next value past the grid's edge: the 1-3-10 series when the grid is on it, else its own ratio."""
    ordered = sorted(grid)
    on_series = all(math.isclose(v, series_value(round(2 * math.log10(v)))) for v in ordered)
    edge = ordered[-1] if upward else ordered[0]
    if on_series:
        n = round(2 * math.log10(edge))
        return series_value(n + 1 if upward else n - 1)
    ratio = ordered[-1] / ordered[-2] if upward else ordered[1] / ordered[0]
    return snap(edge * ratio if upward else edge / ratio)


def build_plan(recipe: str | None, shared: list[str], methods: list[str], variants: list[str],
               grids: dict[str, list[float]], seeds: list[int], wise: list[str], alphas: list[float],
               max_extensions: int, id_test: list[str] | None = None,
               families: dict[str, list[str]] | None = None) -> Plan:
    """Check everything the comparison will need before any run starts (every problem is a UserError)."""
    if not seeds:
        raise UserError("--seeds is empty: give at least one seed, e.g. --seeds 0,1,2")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds repeats a seed ({seeds}): give distinct seeds")
    own = [o for o in shared if o.split("=", 1)[0].strip() in ("train.seed", "train.lr", "train.head_lr")]
    if own:
        raise UserError(f"{own[0]} is set by the comparison itself (--seeds, --grid): remove it")
    specs: list[tuple[str, tuple[str, ...]]] = []
    for name in methods:
        if name not in method_names():
            raise UserError(f"unknown method '{name}' in --methods: choose from {', '.join(method_names())}")
        # a method that declares its own start (LP-FT: a linear probe) gets it whatever head the recipe names
        own_head = ("model.head_init=auto",) if method_spec(name).head_init else ()
        specs.append((name, (f"method.name={name}", *ROW_DEFAULTS.get(name, own_head))))
    for text in variants:
        label, sep, rest = text.partition(":")
        label, extra = label.strip(), rest.split()
        if not sep or not label or not extra or not all("=" in e for e in extra):
            raise UserError(f"--variant '{text}' is not LABEL:key=value ...: write it like "
                            "'full_update_bn:method.name=full method.norm_stats=update'")
        if not any(e.startswith("method.name=") for e in extra):
            raise UserError(f"--variant '{text}' names no method: add method.name=NAME")
        specs.append((label, tuple(extra)))
    labels = [label for label, _ in specs]
    if not specs:
        raise UserError("nothing to compare: give --methods (e.g. full,lp,gmixout) or --variant")
    if len(set(labels)) != len(labels):
        raise UserError(f"two rows share a label ({', '.join(sorted({x for x in labels if labels.count(x) > 1}))}): "
                        "give each --variant its own label")
    for label in [*grids, *wise]:
        if label not in labels:
            raise UserError(f"'{label}' in --grid/--wise is not a row of this comparison: rows are {', '.join(labels)}")
    families = families or {}
    for name, members in families.items():
        unknown = [m for m in members if m not in labels]
        if unknown:
            raise UserError(f"--family {name} names '{unknown[0]}', which is not a row of this comparison: rows are "
                            f"{', '.join(labels)}")
        if len(set(members)) < 2:
            raise UserError(f"--family {name} needs at least two distinct rows, e.g. "
                            "--family gmixout=gmixout,gmixout_filter")
    grouped = [m for members in families.values() for m in set(members)]
    if len(set(grouped)) != len(grouped):
        raise UserError("a row is in two --family groups: give each row at most one family")
    plan = Plan(recipe, list(shared), [], list(seeds), list(wise), list(alphas), max_extensions,
                id_test=list(id_test or []), families={k: list(dict.fromkeys(v)) for k, v in families.items()})
    for label, overrides in specs:
        for o in overrides:
            if o.split("=", 1)[0].strip().startswith(SHARED_PREFIXES):
                raise UserError(f"row {label} sets {o}: the budget and data are the same for every row; "
                                "set it once as a KEY=VALUE argument")
        base = plan.load(label, list(overrides))  # at the recipe's rate: which method, which key
        spec = method_spec(base.method.name)
        key = spec.tuned
        if label in grids:
            grid = sorted(snap(v) for v in grids[label])
            if len(grid) < 2 or len(set(grid)) != len(grid):
                raise UserError(f"--grid {label}: give at least two distinct values (three or more, so that the "
                                "best can lie inside the grid; an edge choice grows the grid)")
        else:
            recipe_value = base.train.lr if key == "train.lr" else (base.train.head_lr or base.train.lr)
            if recipe_value <= 0:
                raise UserError(f"row {label}: the recipe's {key} is {recipe_value}, no grid can start from it: "
                                f"give --grid {label}=V1,V2,V3")
            grid = series_grid(recipe_value * spec.lr_scale)
        bad = [v for v in grid if not 0 < v < 1]
        if bad:
            raise UserError(f"--grid {label}: learning rates must be in (0, 1), got {bad[0]}")
        plan.rows.append(Row(label, overrides, key, tuple(grid)))
        plan.config(plan.rows[-1], grid[0], seeds[0])  # every row's config is valid before anything runs
    note_same_training(plan)
    return plan


def training_identity(plan: Plan, row: Row) -> dict[str, Any]:
    """What decides how a row trains, at a fixed rate: its resolved config with the method's name replaced by its
    implementation and the head by the one it actually starts from (LP-FT and full fine-tuning share a class)."""
    from gmixout_cli.models import auto_head

    cfg = plan.config(row, 1e-4, plan.seeds[0])
    spec = method_spec(cfg.method.name)
    head = method_model_config(cfg).head_init
    flat = flatten_dict(config_to_dict(cfg))
    flat.update({"method.name": f"{spec.method.__qualname__}/{spec.config.__qualname__}",
                 "model.head_init": auto_head(cfg.model.name) if head == "auto" else head})
    return flat


def note_same_training(plan: Plan) -> None:
    """A note for every two rows that are the same training under two names: they would spend their runs twice
    and report the same numbers (full fine-tuning and LP-FT on a backbone whose recipe starts from a probe)."""
    seen: dict[str, Row] = {}
    for row in plan.rows:
        flat = training_identity(plan, row)
        identity = repr(sorted(flat.items()))
        if identity in seen:
            first, head = seen[identity], flat["model.head_init"]
            # the hint names a row free to change its head (LP-FT's start is its definition)
            free = next((r for r in (first, row) if not method_spec(r.method).head_init), None)
            hint = (f"; to start {free.label} from another head, give it as --variant "
                    f"'{free.label}:{' '.join(free.overrides)} model.head_init=zero'") if free else ""
            plan.notes.append(f"rows {first.label} and {row.label} are the same training here (both from a {head} "
                              f"head): expect the same numbers{hint}")
        else:
            seen[identity] = row


def stale_keys(saved: dict[str, Any], planned: Config) -> list[str]:
    """Settings of a run folder's config.yaml that differ from the plan (machine-only keys aside; the data by its
    domain folder's name, so that a comparison's runs still count on a machine that keeps the data elsewhere; a
    setting added after the run was trained, planned at its default, which keeps the earlier behaviour)."""
    defaults = flatten_dict(config_to_dict(build_config(parse_overrides([f"method.name={planned.method.name}"]))))
    now, old = flatten_dict(config_to_dict(planned)), {**defaults, **flatten_dict(saved)}
    for flat in (now, old):
        flat["data.root"] = Path(str(flat.get("data.root", ""))).name
    return [k for k in sorted(set(now) | set(old)) if not k.startswith(MACHINE_KEYS) and now.get(k) != old.get(k)]


def run_dir(out: Path, row: Row, key: RunKey) -> Path:
    return out / "runs" / key.folder(row.key)
