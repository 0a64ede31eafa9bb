"""A comparison's report: mean ± std over seeds per row, WiSE-FT rows, the oracle and one-SE tables; JSON,
markdown, PNG."""

from __future__ import annotations

import datetime
import math
import shlex
import statistics
import sys
from pathlib import Path
from typing import Any

from gmixout_cli.utils.environment import library_versions
from gmixout_cli.utils.io import atomic_path, write_json, write_text


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for one value) in percent."""
    pct = [100.0 * v for v in values]
    return {"mean": statistics.fmean(pct), "std": statistics.stdev(pct) if len(pct) > 1 else 0.0, "n": len(pct)}


def ood_mean(ood: dict[str, float], id_test: list[str]) -> float:
    """The mean top-1 over the sibling domains that are not in-distribution tests (0 when there are none)."""
    values = [v for d, v in ood.items() if d not in id_test]
    return statistics.fmean(values) if values else 0.0


def _metrics(run: dict[str, Any], id_test: list[str]) -> dict[str, float]:
    return {"id": float(next(iter(run["id"].values()))), **run["ood"], "ood_mean": ood_mean(run["ood"], id_test)}


def _id_test(state: dict[str, Any]) -> list[str]:
    return list(state["plan"].get("id_test", []))


def wise_selected(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The curve's point with the best held-out top-1 (ties: the larger alpha, closer to the fine-tuned model)."""
    return max(curve, key=lambda p: (float(next(iter(p["id"].values()))), p["alpha"]))


def at_selected(state: dict[str, Any], entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The runs (or WiSE-FT curves) trained at their row's selected value; the grid's other values drop out."""
    return [e for e in entries if state["selected"].get(e["label"]) == e["value"]]


def held_out_se(accuracy: float, runs: list[dict[str, Any]]) -> float | None:
    """The held-out split's binomial standard error (in %) at `accuracy` (in %); None when no run recorded the
    split's size."""
    sizes = [int(r["held_out_images"]) for r in runs if r.get("held_out_images")]
    if not sizes:
        return None
    p = min(max(accuracy / 100.0, 0.0), 1.0)
    return 100.0 * math.sqrt(p * (1.0 - p) / min(sizes))


def start_gap(start: float, end: float, runs: list[dict[str, Any]]) -> bool:
    """Whether a row ends below its start (held-out top-1 in %) by more than the held-out split's binomial
    standard error at the start's accuracy: closer than that, the split cannot tell the two apart."""
    se = held_out_se(start, runs)
    return end < start if se is None else start - end > se  # size unknown (older runs): any drop counts


def summarise(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """label -> the selected value's metrics over seeds (mean/std in %), its grid, edge and start flags."""
    out: dict[str, dict[str, Any]] = {}
    for row in state["plan"]["rows"]:
        label = row["label"]
        if label not in state["selected"]:
            continue
        value, grid = state["selected"][label], state["grids"][label]
        kept = [r for r in state["runs"] if r["label"] == label and r["value"] == value]
        runs = [r for r in kept if not r.get("diverged")]
        if not runs:
            continue
        metrics = [_metrics(r, _id_test(state)) for r in runs]
        starts = [r["linear_probe"]["val_top1"] for r in runs
                  if r.get("linear_probe") and r["linear_probe"].get("val_top1") is not None]
        summary: dict[str, Any] = {k: mean_std([m[k] for m in metrics]) for k in metrics[0]}
        summary.update(key=row["key"], grid=grid, selected=value, at_edge=value in (min(grid), max(grid)),
                       start=mean_std(starts) if starts else None)
        summary["below_start"] = bool(starts) and start_gap(summary["start"]["mean"], summary["id"]["mean"], runs)
        summary["diverged"] = sorted({r["value"] for r in state["runs"] if r["label"] == label and r.get("diverged")})
        summary["diverged_seeds"] = len(kept) - len(runs)
        summary["family"] = family_role(state, label)
        out[label] = summary
    for wise in _group_wise(state):
        label, curves = wise
        points = [_metrics(wise_selected(c), _id_test(state)) for c in curves]
        alphas = [wise_selected(c)["alpha"] for c in curves]
        out[f"wise-ft ({label})"] = {**{k: mean_std([p[k] for p in points]) for k in points[0]},
                                     "key": "alpha", "grid": sorted({p["alpha"] for c in curves for p in c}),
                                     "selected": alphas, "at_edge": False, "start": None, "below_start": False,
                                     "diverged": [], "diverged_seeds": 0, "family": family_role(state, label)}
    return out


def family_role(state: dict[str, Any], label: str) -> str | None:
    """A family member's part once the family chose: 'chosen for F' or 'F: not chosen' (else None)."""
    for name, family in state.get("families", {}).items():
        if label in family["members"] and family["chosen"]:
            return f"chosen for {name}" if label == family["chosen"] else f"{name}: not chosen"
    return None


def headline(summary: dict[str, Any]) -> bool:
    """Whether a summary row stands in the headline (a family's unchosen members ran the first seed only)."""
    return not (summary.get("family") or "").endswith("not chosen")


def _group_wise(state: dict[str, Any]) -> list[tuple[str, list[list[dict[str, Any]]]]]:
    groups: dict[str, list[list[dict[str, Any]]]] = {}
    for w in state["wise"]:
        groups.setdefault(w["label"], []).append(w["curve"])
    return sorted(groups.items())


def oracle(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per row, the grid value with the best out-of-domain mean at the first seed: each row's headroom if the
    target domains could choose (never used for the headline table)."""
    seed = state["plan"]["seeds"][0]
    out = {}
    for label in state["selected"]:
        runs = [r for r in state["runs"] if r["label"] == label and r["seed"] == seed and not r.get("diverged")]
        if not runs:
            continue
        best = max(runs, key=lambda r: (_metrics(r, _id_test(state))["ood_mean"], -r["value"]))
        out[label] = {"value": best["value"], **{k: 100.0 * v for k, v in _metrics(best, _id_test(state)).items()}}
    return out


def one_se(state: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per learning-rate row, what the one-standard-error rule would have chosen at the first seed: the lowest lr
    whose held-out top-1 is within one binomial standard error of the grid's best (the split cannot tell them
    apart, and the smaller step stays nearer the pretrained weights). Held-out data only, like the headline; a
    sensitivity check of the selection beside it, never a replacement (the other seeds ran at the headline's
    choice)."""
    seed, keys = state["plan"]["seeds"][0], {r["label"]: r["key"] for r in state["plan"]["rows"]}
    out = {}
    for label, points in first_seed_grids(state).items():
        scores = {v: (held, ood) for v, held, ood in points if held is not None}
        chosen = state["selected"][label]
        if not keys.get(label, "").endswith("lr") or chosen not in scores:
            continue
        best = max(held for held, _ in scores.values())
        se = held_out_se(best, [r for r in state["runs"] if r["label"] == label and r["seed"] == seed])
        if se is None:
            continue
        value = min(v for v, (held, _) in scores.items() if held >= best - se)
        out[label] = {"value": value, "selected": chosen, "se": se, "id": scores[value][0],
                      "ood_mean": scores[value][1], "selected_id": scores[chosen][0],
                      "selected_ood_mean": scores[chosen][1]}
    return out


def first_seed_grids(state: dict[str, Any]) -> dict[str, list[tuple[float, float | None, float | None]]]:
    """Per row, every grid value at the first seed: (value, held-out ID %, OOD mean %); None for a diverged run."""
    seed, out = state["plan"]["seeds"][0], {}
    for label in state["selected"]:
        runs = sorted((r for r in state["runs"] if r["label"] == label and r["seed"] == seed), key=lambda r: r["value"])
        out[label] = [(r["value"], None, None) if r.get("diverged") else
                      (r["value"], *(100.0 * _metrics(r, _id_test(state))[k] for k in ("id", "ood_mean")))
                      for r in runs]
    return out


def _grid_cell(value: float, held: float | None, ood: float | None, chosen: float, planned: list[float] | None) -> str:
    text = f"{value:g}: " + ("diverged" if held is None else f"{held:.1f} / {ood:.1f}") + (
        " (grown)" if planned is not None and value not in planned else "")
    return f"**{text}**" if value == chosen else text


def _cell(m: dict[str, float]) -> str:
    return f"{m['mean']:.1f} ± {m['std']:.1f}"


def markdown(state: dict[str, Any], summary: dict[str, dict[str, Any]], domains: list[str], title: str) -> str:
    """The headline table (selection on held-out in-domain data only), then the oracle table."""
    id_test = [d for d in domains if d in _id_test(state)]
    domains = id_test + [d for d in domains if d not in id_test]  # in-distribution tests first, apart from the mean
    lines = [f"### {title}", ""]
    if len(domains) > 3:  # many test domains: their means first, each domain in the full table below
        lines += ["| method | held-out ID | " + "".join(f"{d} (ID test) | " for d in id_test) + "OOD mean | seeds |",
                  "|---|---|" + "---|" * len(id_test) + "---|---|"]
        lines += [f"| {label} | {_cell(s['id'])} | " + "".join(f"{_cell(s[d])} | " for d in id_test)
                  + f"{_cell(s['ood_mean'])} | {s['id']['n']} |" for label, s in summary.items() if headline(s)]
        lines += ["", "Every test domain:", ""]
    lines += ["| method | tuned | grid (selected in bold) | held-out ID | "
             + " | ".join(f"{d} (ID test)" if d in id_test else d for d in domains) + " | OOD mean | seeds |",
             "|---|---|---|---|" + "---|" * len(domains) + "---|---|"]
    for label, s in summary.items():
        selected = s["selected"] if isinstance(s["selected"], list) else [s["selected"]]
        grid = ", ".join(f"**{v:g}**" if v in selected else f"{v:g}†" if v in s.get("diverged", []) else f"{v:g}"
                         for v in s["grid"])
        role = s.get("family")
        member = f" ({role}, {'on held-out' if headline(s) else 'first seed only'})" if role else ""
        flags = member + (" (edge)" if s["at_edge"] else "") + (" ⚠ below its start" if s["below_start"] else "") + (
            f" ({s['diverged_seeds']} seeds diverged)" if s.get("diverged_seeds") else "")
        cells = " | ".join(_cell(s[d]) for d in domains)
        lines.append(f"| {label}{flags} | {s['key'].split('.')[-1]} | {grid} | {_cell(s['id'])} | {cells} | "
                     f"{_cell(s['ood_mean'])} | {s['id']['n']} |")
    starts = {k: s["start"] for k, s in summary.items() if s.get("start")}
    if starts:
        lines += ["", "Starting point (linear-probe head, held-out ID top-1): "
                  + ", ".join(f"{k} {_cell(v)}" for k, v in starts.items()) + "."]
    lines += ["", "Mean ± std over seeds, top-1 %. Each row's value was chosen on the training domain's held-out "
              "split at the first seed (an *edge* value could not be bracketed within the allowed grid "
              "extensions; † diverged); WiSE-FT's alpha is chosen per seed on the same split."
              + (f" The OOD mean leaves out {', '.join(id_test)} (drawn from the training distribution)."
                 if id_test else "")
              + (" Rows of a family (one method's own levers) were chosen among on the same split at the first "
                 "seed; the chosen one ran every seed, the others the first only." if state.get("families") else "")]
    if grids := first_seed_grids(state):
        lines += ["", "#### The first seed's grids (held-out ID / OOD mean per value; the kept one in bold)", "",
                  "| method | grid |", "|---|---|"]
        planned = {r["label"]: r.get("initial_grid") for r in state["plan"]["rows"]}
        lines += [f"| {k} | " + ", ".join(_grid_cell(*point, state["selected"][k], planned.get(k)) for point in points)
                  + " |" for k, points in grids.items()]
    orc = oracle(state)
    if orc:
        lines += ["", "#### Oracle (selected on the target domains, first seed only: headroom, not a result)", "",
                  "| method | value | held-out ID | OOD mean |", "|---|---|---|---|"]
        lines += [f"| {k} | {o['value']:g} | {o['id']:.1f} | {o['ood_mean']:.1f} |" for k, o in orc.items()]
    if rule := one_se(state):
        lines += ["", "#### One-standard-error rule (first seed, held-out only: a check of the selection, not a "
                  "result)", "", "The lowest lr within one standard error of the grid's best held-out top-1, "
                  "beside the headline's choice (held-out ID / OOD mean at the first seed).", "",
                  "| method | chosen | one-SE lr | standard error | chosen: ID / OOD | one-SE: ID / OOD |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {k} | {o['selected']:g} | {o['value']:g} | {o['se']:.1f} | {o['selected_id']:.1f} / "
                  f"{o['selected_ood_mean']:.1f} | {o['id']:.1f} / {o['ood_mean']:.1f} |" for k, o in rule.items()]
    return "\n".join(lines) + "\n"


def plot(path: Path, state: dict[str, Any], summary: dict[str, dict[str, Any]], title: str) -> None:
    """ID vs OOD: one point per row with std error bars, WiSE-FT as a curve over alpha (mean over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 5), dpi=120)
    rows = {k: s for k, s in summary.items() if not k.startswith("wise-ft") and headline(s)}
    for label, s in rows.items():
        ax.errorbar(s["id"]["mean"], s["ood_mean"]["mean"], xerr=s["id"]["std"], yerr=s["ood_mean"]["std"],
                    fmt="o", capsize=3, label=label)
    box = _frame([(s["id"]["mean"], s["ood_mean"]["mean"], s["id"]["std"], s["ood_mean"]["std"])
                  for s in rows.values()])
    for label, curves in _group_wise(state):
        if not headline(summary.get(f"wise-ft ({label})", {})):
            continue
        alphas = sorted({p["alpha"] for c in curves for p in c})
        xs, ys = [], []
        for a in alphas:
            pts = [_metrics(p, _id_test(state)) for c in curves for p in c if p["alpha"] == a]
            xs.append(100 * statistics.fmean(p["id"] for p in pts))
            ys.append(100 * statistics.fmean(p["ood_mean"] for p in pts))
        # the rows set the axes: a curve's far end (alpha 0 from a zero head is chance) is named, not drawn
        off = [f"{a:g} at {x:.1f}, {y:.1f}" for a, x, y in zip(alphas, xs, ys, strict=True)
               if not (box[0] <= x <= box[1] and box[2] <= y <= box[3])]
        ax.plot(xs, ys, "--", marker=".", label=f"WiSE-FT ({label}), alpha {alphas[0]:g}..{alphas[-1]:g}"
                + "".join(f"\n  off the axes: alpha {o}" for o in off))
    ax.set_xlim(box[0], box[1])
    ax.set_ylim(box[2], box[3])
    ax.set_xlabel("held-out in-domain top-1 (%)")
    ax.set_ylabel("out-of-domain mean top-1 (%)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the points, never on them
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)


def _frame(points: list[tuple[float, float, float, float]]) -> tuple[float, float, float, float]:
    """Axis limits around the rows' points and error bars (x, y, xerr, yerr), with a margin."""
    x0, x1 = min(x - dx for x, _, dx, _ in points), max(x + dx for x, _, dx, _ in points)
    y0, y1 = min(y - dy for _, y, _, dy in points), max(y + dy for _, y, _, dy in points)
    mx, my = max(1.0, 0.15 * (x1 - x0)), max(1.0, 0.15 * (y1 - y0))
    return x0 - mx, x1 + mx, y0 - my, y1 + my


def compare_command(argv: list[str]) -> str:
    """The command line that reproduces a comparison, quoted for a shell."""
    return " ".join(["gmixout", *(shlex.quote(a) for a in argv)])


def write_report(out: Path, state: dict[str, Any], title: str) -> dict[str, Any]:
    """compare.json, compare.md, compare.png in `out`; returns the JSON's content."""
    summary = summarise(state)
    done = [s["id"]["n"] for k, s in summary.items() if not k.startswith("wise-ft") and headline(s)]
    if done and min(done) < len(state["plan"]["seeds"]):  # a comparison stopped early publishes what it has
        seeds = f"{min(done)}" if min(done) == max(done) else f"{min(done)} to {max(done)}"
        title += f" (partial: {seeds} of {len(state['plan']['seeds'])} seeds so far)"
    domains = sorted({d for r in state["runs"] for d in r["ood"]})
    report = {"title": title, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "command": compare_command(sys.argv[1:]), "versions": library_versions(),
              "summary": summary, "oracle": oracle(state) if summary else {},
              "one_se": one_se(state) if summary else {}, **state}
    write_json(out / "compare.json", report)
    if summary:
        write_text(out / "compare.md", markdown(state, summary, domains, title))
        plot(out / "compare.png", state, summary, title)
    return report
