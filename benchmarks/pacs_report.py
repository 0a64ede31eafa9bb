"""The PACS benchmark's summary: mean and std over seeds, a markdown table and the ID-vs-OOD plot."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

COLUMNS = ("test", "crossval", "ood_mean")


def mean_std(values: list[float]) -> dict[str, float]:
    """Mean and sample standard deviation (0 for a single value) in percent."""
    pct = [100.0 * v for v in values]
    return {"mean": statistics.fmean(pct), "std": statistics.stdev(pct) if len(pct) > 1 else 0.0, "n": len(pct)}


def _metrics(run: dict[str, Any]) -> dict[str, float]:
    return {"test": run["test"], "crossval": run["crossval"], **run["ood"], "ood_mean": run["ood_mean"]}


def wise_selected(curve: list[dict[str, Any]]) -> dict[str, Any]:
    """The curve's point with the best crossval top-1 (ties: the larger alpha, closer to the fine-tuned model)."""
    return max(curve, key=lambda p: (p["crossval"], p["alpha"]))


def summarise(report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """method -> {metric: mean/std over seeds}, plus the WiSE-FT row (alpha chosen on crossval per seed)."""
    rows: dict[str, list[dict[str, float]]] = {}
    for run in report["runs"]:
        rows.setdefault(run["method"], []).append(_metrics(run))
    if report.get("wise_ft_lpft"):
        rows["wise-ft (lpft)"] = [_metrics(wise_selected(w["curve"])) for w in report["wise_ft_lpft"]]
    out = {}
    for method, runs in rows.items():
        out[method] = {k: mean_std([r[k] for r in runs]) for k in runs[0]}
    return out


def wise_mean_curve(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Per alpha: mean and std over seeds of test and OOD-mean top-1."""
    curves = [w["curve"] for w in report.get("wise_ft_lpft", [])]
    if not curves:
        return []
    return [{"alpha": pts[0]["alpha"], "test": mean_std([p["test"] for p in pts]),
             "crossval": mean_std([p["crossval"] for p in pts]), "ood_mean": mean_std([p["ood_mean"] for p in pts])}
            for pts in zip(*curves, strict=False)]


BUDGET_KEYS = ("epochs", "image_size", "batch_size", "seeds", "extra_overrides")


def carry_over(new: dict[str, Any], old: dict[str, Any], rerun: list[str]) -> dict[str, Any]:
    """`new` (the methods in `rerun`) completed with the other methods' selection, runs and WiSE-FT curve from
    `old`, a report written before at the same budget. Each method's training commit stays on record
    (`row_commits`), and the rows a rerun replaces are kept under `replaced` (summary and commit)."""
    differ = [k for k in BUDGET_KEYS if old["settings"].get(k) != new["settings"].get(k)]
    if differ:
        raise ValueError(f"the earlier report's {', '.join(differ)} differ from this run's: rerun every method")
    old_commits = {**{r["method"]: old["git_commit"] for r in old["runs"]}, **old.get("row_commits", {})}
    kept = [r for r in old["runs"] if r["method"] not in rerun]
    out = dict(new, runs=kept + new["runs"],
               selection={**{m: v for m, v in old["selection"].items() if m not in rerun}, **new["selection"]})
    out["settings"] = dict(new["settings"], method_overrides={**old["settings"].get("method_overrides", {}),
                                                              **new["settings"]["method_overrides"]})
    if "lpft" not in rerun:
        out["wise_ft_lpft"] = old.get("wise_ft_lpft", [])
    out["row_commits"] = {**{r["method"]: old_commits[r["method"]] for r in kept},
                          **{r["method"]: new["git_commit"] for r in new["runs"]}}
    out["device"] = ", ".join(sorted({r["device"] for r in out["runs"]}))
    out["replaced"] = list(old.get("replaced", [])) + [
        {"method": m, "git_commit": old_commits[m], "summary": old["summary"][m]}
        for m in rerun if m in old.get("summary", {})]
    return out


def markdown(report: dict[str, Any], summary: dict[str, dict[str, Any]]) -> str:
    ood = report["ood_domains"]
    s = report["settings"]
    head = ["method", "lr (selected)", "ID test", "ID crossval", *ood, "OOD mean", "seeds"]
    lines = [
        f"### PACS, {report['backbone']}, source {report['source']} ({s['image_size']} px, {s['epochs']} epochs, "
        f"batch {s['batch_size']}; top-1 %, mean ± std over seeds)",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    def row(name: str, lr: str, m: dict[str, Any]) -> str:
        cells = [f"{m[k]['mean']:.1f} ± {m[k]['std']:.1f}" for k in ("test", "crossval", *ood, "ood_mean")]
        return "| " + " | ".join([name, lr, *cells, str(m["test"]["n"])]) + " |"

    for method, m in summary.items():
        sel = report["selection"].get(method.split(" ")[0] if method.startswith("wise") else method)
        if method.startswith("wise"):
            lr = "α on crossval"
        else:
            lr = f"{sel['key'].split('.')[-1]}={sel['selected']:g}" if sel else ""
        lines.append(row(method, lr, m))
    for old in report.get("replaced", []):  # a method's earlier rows, before a recipe change reran it
        lines.append(row(f"{old['method']} (replaced; commit {old['git_commit'][:7]})", "", old["summary"]))
    commits = report.get("row_commits")
    trained = f"commit {report['git_commit']}"
    if commits and len(set(commits.values())) > 1:
        by_commit: dict[str, list[str]] = {}
        for method, commit in commits.items():
            by_commit.setdefault(commit[:7], []).append(method)
        trained = "trained at commits " + "; ".join(f"{c} ({', '.join(ms)})" for c, ms in by_commit.items())
    lines += ["", f"device {report['device']}, {trained}, {report['date'][:10]}; "
              f"`{report['command']}`. ID test is PACS's official test list (train + crossval images); "
              "ID crossval is held out but selected the learning rate."]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], summary: dict[str, dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 5), dpi=120)
    for method, m in summary.items():
        if method.startswith("wise"):
            continue
        ax.errorbar(m["ood_mean"]["mean"], m["test"]["mean"], xerr=m["ood_mean"]["std"], yerr=m["test"]["std"],
                    fmt="*" if method == "gmixout" else "o", ms=12 if method == "gmixout" else 6, capsize=3,
                    label=method)
    curve = wise_mean_curve(report)
    if curve:
        ax.plot([p["ood_mean"]["mean"] for p in curve], [p["test"]["mean"] for p in curve], "k--", lw=1,
                label="WiSE-FT (lpft), α = 0 … 1")
        for p in curve:
            ax.annotate(f"{p['alpha']:g}", (p["ood_mean"]["mean"], p["test"]["mean"]), fontsize=7,
                        textcoords="offset points", xytext=(3, -9))
    s = report["settings"]
    ax.set_xlabel(f"out-of-domain top-1 % (mean of {', '.join(report['ood_domains'])})")
    ax.set_ylabel(f"in-domain top-1 % ({report['source']} test list)")
    counts = sorted({m["test"]["n"] for m in summary.values()})
    seeds = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    ax.set_title(f"PACS, {report['backbone']}, source {report['source']}, {s['image_size']} px, "
                 f"{seeds} seeds per point (mean ± std)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)


def write_report(report: dict[str, Any], stem: Path) -> Path:
    """Write stem.json (everything, with the summary), stem.md (the table) and stem.png (the plot)."""
    from gmixout_cli.utils.io import write_json, write_text

    stem.parent.mkdir(parents=True, exist_ok=True)
    summary = summarise(report)
    report = dict(report, summary=summary, wise_ft_mean_curve=wise_mean_curve(report))
    write_json(stem.with_suffix(".json"), report)
    write_text(stem.with_suffix(".md"), markdown(report, summary))
    plot(report, summary, stem.with_suffix(".png"))
    return stem


if __name__ == "__main__":  # re-render the table and plot of a JSON written before
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs_report",
                                 description="Re-render the table and plot of PACS reports written before.")
    ap.add_argument("reports", nargs="+", type=Path, help="pacs_<backbone>_<source>.json files")
    for name in ap.parse_args().reports:
        data = json.loads(name.read_text())
        write_report({k: v for k, v in data.items() if k not in ("summary", "wise_ft_mean_curve")},
                     name.with_suffix(""))
