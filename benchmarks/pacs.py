"""PACS with `gmixout compare`: every source domain, the other three as targets, then the 12-pair means.

    python -m benchmarks.pacs_pack --size 112 --out .pacs112  # once: PACS resized (227 px JPEG decoding is slow)
    python -m benchmarks.pacs --data .pacs112 --sources sketch --dry-run
    nohup python -m benchmarks.pacs --data .pacs112 --sources art_painting,cartoon,photo,sketch &
    python -m benchmarks.pacs --data .pacs112 --sources ... --publish  # meanwhile: the runs so far, to commit
    python -m benchmarks.pacs --report                        # the pooled table from the committed sources
    python -m benchmarks.pacs --data .pacs112 --levers        # GMixout's levers in its family: *_levers.* reports

Each source is one `gmixout compare` command (printed, then run in this process): the rows below, one
shared budget (`--steps` optimizer steps at `--image-size`, so GMixout's 30 episodes last steps/30 steps
each on every source), learning rates chosen on the source's official crossval list at the first seed
(grids grow past an edge), the other seeds at the chosen value, WiSE-FT curves for LP-FT and GMixout.
Its compare.{json,md,png} are copied to benchmarks/results/pacs_<backbone>_<source>.* with the commit
and the command. Runs live under --work and are reused, so a cut-off source continues where it stopped.
The pooled report averages, per row and seed, the 12 source -> target accuracies (and the 4 held-out
in-domain ones), then gives mean ± std over seeds; a source whose comparison has not finished is left out.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from benchmarks.bench_common import (
    ANCHOR_EMA_ROWS,
    BATCH_STATS_ROW,
    FILTER_MASK_ROW,
    FULL_ROW,
    RESULTS,
    ROOT,
    SPARSE_MASK_ROWS,
    STANDALONE_ROWS,
    command_line,
    git_head,
    lever_families,
    publish_compare,
    restore_runs,
    row_label,
    run_gmixout,
)
from gmixout_cli.compare.report import at_selected, one_se, plot, wise_selected
from gmixout_cli.utils.io import write_json, write_text

SOURCES = ("art_painting", "cartoon", "photo", "sketch")
METHODS = "lp,lpft,lora,mixout,randmask,gmixout"
VARIANTS = (FULL_ROW, BATCH_STATS_ROW, FILTER_MASK_ROW, *SPARSE_MASK_ROWS, *STANDALONE_ROWS)
# Three-point grids centred on what sketch's seed-0 grids chose at this budget, starting from the recipe-centred
# grids (2026-12-03, commit 82c60a9): full, LP-FT, Mixout, RandMask, GMixout 3e-4; full with batch statistics
# 1e-3; LoRA 3e-3; the probe's head lr 1e-2; filter masks 1e-4. That saves the runs each grid spent growing.
# The protocol is unchanged: an edge choice still grows the grid, and the table shows grid and choice.
GRIDS = ("full=1e-4,3e-4,1e-3", "lp=3e-3,1e-2,3e-2", "lpft=1e-4,3e-4,1e-3", "lora=1e-3,3e-3,1e-2",
         "mixout=1e-4,3e-4,1e-3", "randmask=1e-4,3e-4,1e-3", "gmixout=1e-4,3e-4,1e-3",
         "full_update_bn=3e-4,1e-3,3e-3", "gmixout_filter=3e-5,1e-4,3e-4", "gmixout_episodes300=1e-4,3e-4,1e-3",
         "gmixout_lp_head=1e-4,3e-4,1e-3", "gmixout_p0.95=1e-4,3e-4,1e-3",
         "gmixout_p0.98=3e-5,1e-4,3e-4",  # s = 50: each kept entry moves 2.5 times further than at p 0.95
         "gmixout_p0.95_lam0.3=1e-4,3e-4,1e-3")

# GMixout's episode levers (`--levers`), added to its family and chosen with the mask level on held-out data at
# the first seed: the anchor EMA over the paper's stable range, AdamW moments kept across episodes (a fresh
# episode's first step then is not a full-lr sign step on every kept entry), and the episode length on both
# sides of the default 20 steps: 10 episodes of 60 steps, 100 of 6 (nearer Mixout's fresh mask every step); and
# biases and BatchNorm's affine parameters trained densely, as Mixout and full fine-tuning train them.
LEVERS = (*ANCHOR_EMA_ROWS, "gmixout_keep_moments:method.name=gmixout method.reset_moments=false",
          "gmixout_episodes10:method.name=gmixout method.episodes=10",
          "gmixout_episodes100:method.name=gmixout method.episodes=100",
          "gmixout_bias_norm:method.name=gmixout method.train_bias_norm=true")
LEVER_GRIDS = tuple(f"{row_label(v)}=1e-4,3e-4,1e-3" for v in LEVERS)


def command(args: argparse.Namespace, source: str) -> list[str]:
    """The `gmixout compare` arguments for one source."""
    out = args.work / f"{args.backbone}-{source}"
    cmd = ["compare", "--data", str(args.data / source), "--recipe", f"gmixout_{args.backbone}",
           "--methods", args.methods, "--seeds", args.seeds, "--wise", "lpft,gmixout", "--out", str(out),
           f"data.image_size={args.image_size}", f"train.max_steps={args.steps}", "train.epochs=1000",
           f"data.num_workers={args.workers}", *args.shared]
    for v in args.variants:
        cmd += ["--variant", v]
    rows = {*args.methods.split(","), *(row_label(v) for v in args.variants)}
    for g in args.grids:
        if g.partition("=")[0] in rows:
            cmd += ["--grid", g]
    return cmd + lever_families(args.methods, args.variants) + (["--dry-run"] if args.dry_run else [])


def source_stem(args: argparse.Namespace, source: str) -> Path:
    """Where a source's report goes: the levers protocol (GMixout's family grown by its levers) reports beside
    the headline, never over it, so the pooled table never mixes the two protocols across sources."""
    return args.out / f"pacs_{args.backbone}_{source}{'_levers' if args.levers else ''}"


def publish(args: argparse.Namespace, source: str) -> None:
    """The source's report so far (its JSON says which runs finished) and its runs' small files."""
    folder, stem = args.work / f"{args.backbone}-{source}", source_stem(args, source)
    if args.dry_run or not (folder / "compare.json").is_file():
        return
    argv = [a for a in args.argv if a != "--publish"]
    publish_compare(folder, stem, {"benchmark": "pacs", "source": source, "backbone": args.backbone,
                                   "git_commit": args.commit,
                                   "command": command_line("pacs", argv)},
                    command(args, source))
    print(f"pacs: wrote {stem}.json, .md, .png, _runs.tgz", flush=True)


def run_source(args: argparse.Namespace, source: str) -> None:
    folder = args.work / f"{args.backbone}-{source}"
    for stem in {source_stem(args, source), args.out / f"pacs_{args.backbone}_{source}"}:
        restore_runs(folder, stem)  # runs committed by an earlier session on another machine count as done
    try:
        run_gmixout(command(args, source))
    finally:  # a stopped comparison publishes what it has, so the next session continues
        publish(args, source)


def pooled_label(report: dict[str, Any], label: str) -> str | None:
    """The pooled row a source's row counts in: a family's chosen member counts as the family (the lever is the
    method's, chosen per source on held-out data), its other members drop out (they ran the first seed only)."""
    for name, family in report.get("families", {}).items():
        if label in family["members"]:
            return name if label == family["chosen"] else None
    return label


def pooled(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per row: for each seed, the mean over every (source, target) pair and over the sources' held-out ID.
    A diverged run counts as missing, as in each source's own table; a seed pools only where every source has it."""
    rows: dict[str, dict[int, dict[str, list[float]]]] = {}
    members: dict[str, dict[str, str]] = {}

    def add(label: str, seed: int, point: dict[str, Any]) -> None:
        per_seed = rows.setdefault(label, {}).setdefault(seed, {"ood": [], "id": []})
        per_seed["ood"] += [100 * a for a in point["ood"].values()]
        per_seed["id"].append(100 * next(iter(point["id"].values())))

    for source, report in reports.items():
        for run in at_selected(report, report["runs"]):
            if (label := pooled_label(report, run["label"])) and not run.get("diverged"):
                add(label, run["seed"], run)
                if label in report.get("families", {}):
                    members.setdefault(label, {})[source] = run["label"]
        for curve in at_selected(report, report.get("wise", [])):  # alpha per seed on held-out, as in each table
            if label := pooled_label(report, curve["label"]):
                add(f"wise-ft ({label})", curve["seed"], wise_selected(curve["curve"]))
    out: dict[str, Any] = {}
    for label, seeds in rows.items():
        complete = {s: v for s, v in seeds.items() if len(v["id"]) == len(reports)}  # every source has the seed
        if not complete:
            continue
        ood = [statistics.fmean(v["ood"]) for v in complete.values()]
        idm = [statistics.fmean(v["id"]) for v in complete.values()]
        out[label] = {"ood_mean": statistics.fmean(ood), "ood_std": statistics.stdev(ood) if len(ood) > 1 else 0.0,
                      "id_mean": statistics.fmean(idm), "id_std": statistics.stdev(idm) if len(idm) > 1 else 0.0,
                      "seeds": len(complete), "pairs": len(complete[next(iter(complete))]["ood"]),
                      **({"chosen": members[label]} if label in members else {})}
    return out


def pooled_one_se(reports: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per row, the first seed's held-out ID and OOD mean over the sources at the headline's lr and at the
    one-standard-error rule's lr (each source's own choice; rows every source has)."""
    picks: dict[str, list[dict[str, Any]]] = {}
    for report in reports.values():
        for label, pick in one_se(report).items():
            if row := pooled_label(report, label):
                picks.setdefault(row, []).append(pick)
    return {row: {k: statistics.fmean(p[k] for p in ps) for k in ("selected_id", "selected_ood_mean", "id",
                                                                   "ood_mean")}
            for row, ps in picks.items() if len(ps) == len(reports)}


def pooled_curves(reports: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """WiSE-FT curves pooled like the rows: per family/row and seed, at each alpha, the held-out ID mean over the
    sources and every source -> target accuracy, in compare's curve shape (so its plot draws them)."""
    points: dict[tuple[str, int, float], dict[str, list[float]]] = {}
    for report in reports.values():
        for curve in at_selected(report, report.get("wise", [])):
            if label := pooled_label(report, curve["label"]):
                for p in curve["curve"]:
                    acc = points.setdefault((label, curve["seed"], p["alpha"]), {"id": [], "ood": []})
                    acc["id"].append(next(iter(p["id"].values())))
                    acc["ood"] += [p["ood"][t] for t in sorted(p["ood"])]
    curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for (label, seed, alpha), acc in sorted(points.items()):
        if len(acc["id"]) == len(reports):
            curves.setdefault((label, seed), []).append({"alpha": alpha, "id": {"pooled": statistics.fmean(acc["id"])},
                                                         "ood": dict(enumerate(acc["ood"]))})
    return [{"label": label, "seed": seed, "curve": c} for (label, seed), c in curves.items()]


def finished(report: dict[str, Any]) -> bool:
    """Whether a source's comparison ran its whole plan (reports from before the flag: no partial title)."""
    return report.get("complete", "(partial:" not in report.get("title", ""))


def write_pooled(args: argparse.Namespace) -> None:
    reports = {s: json.loads(p.read_text()) for s in SOURCES
               if (p := source_stem(args, s).with_suffix(".json")).is_file()}
    if not reports:
        raise SystemExit(f"pacs: no per-source report for {args.backbone}{' --levers' * args.levers} in {args.out}")
    if stale := [s for s, r in reports.items() if "selected" not in r]:
        raise SystemExit(f"pacs: pacs_{args.backbone}_{{{','.join(stale)}}}.json are not `gmixout compare` reports: "
                         "move them aside (earlier harnesses' files are named pacs_earlier_*)")
    if partial := [s for s, r in reports.items() if not finished(r)]:  # a stopped source is not pooled yet
        print(f"pacs: {', '.join(partial)} not finished: left out of the pooled report", flush=True)
        reports = {s: r for s, r in reports.items() if s not in partial}
        if not reports:
            print("pacs: no finished source: no pooled report", flush=True)
            return
    table, rule = pooled(reports), pooled_one_se(reports)
    stem = args.out / f"pacs_{args.backbone}{'_levers' if args.levers else ''}_pooled"
    write_json(stem.with_suffix(".json"), {"benchmark": "pacs_pooled", "backbone": args.backbone,
                                           "sources": sorted(reports), "git_commit": git_head(),
                                           "source_commits": {s: r.get("git_commit") for s, r in reports.items()},
                                           "command": command_line("pacs", args.argv),
                                           "rows": table, "one_se_first_seed": rule})
    over = f"mean over {len(reports)} source{'s' * (len(reports) > 1)} ({', '.join(sorted(reports))})"
    lines = [f"### PACS, {args.backbone}: {over}", "",
             "| method | held-out ID | OOD mean (source -> target pairs) | seeds |", "|---|---|---|---|"]
    lines += [f"| {k} | {r['id_mean']:.1f} ± {r['id_std']:.1f} | {r['ood_mean']:.1f} ± {r['ood_std']:.1f} "
              f"({r['pairs']} pairs) | {r['seeds']} |"
              for k, r in sorted(table.items(), key=lambda i: -i[1]["ood_mean"])]
    lines += [f"\n{k} is a family: its member chosen on each source's held-out split was "
              + ", ".join(f"{m} ({s})" for s, m in sorted(r["chosen"].items())) + "."
              for k, r in table.items() if r.get("chosen")]
    lines += ["", "First seed, the headline's selection against the one-standard-error rule (the lowest lr within "
              "one standard error of the best; each source's held-out split chooses either way): held-out ID / "
              "OOD mean", "",
              "| method | headline rule | one-SE rule |", "|---|---|---|"]
    lines += [f"| {k} | {r['selected_id']:.1f} / {r['selected_ood_mean']:.1f} | {r['id']:.1f} / {r['ood_mean']:.1f} |"
              for k, r in sorted(rule.items(), key=lambda i: -i[1]["selected_ood_mean"])]
    write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    summary = {k: {"id": {"mean": r["id_mean"], "std": r["id_std"]}, "ood_mean": {"mean": r["ood_mean"],
                                                                                  "std": r["ood_std"]}}
               for k, r in table.items()}
    plot(stem.with_suffix(".png"), {"plan": {}, "wise": pooled_curves(reports)}, summary,
         f"PACS, {args.backbone}: {over}, mean ± std over seeds")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.pacs", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--backbone", default="efficientnet_lite0", choices=["efficientnet_lite0", "mobilenet_v2"])
    ap.add_argument("--sources", default=",".join(SOURCES))
    ap.add_argument("--methods", default=METHODS)
    ap.add_argument("--variants", action="append", default=None, help=f"extra rows (default: {VARIANTS})")
    ap.add_argument("--grids", action="append", default=None, help=f"'ROW=V1,V2,V3' (default: {GRIDS})")
    ap.add_argument("--levers", action="store_true",
                    help="also GMixout's levers (anchor EMA 0.3 / 0.7, moments kept, 10 or 100 episodes, biases and "
                         "norms trained) in its family, chosen on held-out data; finished runs are reused: this adds "
                         "their seed-0 grids. Reports go to pacs_<backbone>_<source>_levers.* and the pooled one to "
                         "pacs_<backbone>_levers_pooled.*, beside the headline's")
    ap.add_argument("--set", dest="shared", action="append", default=[], metavar="KEY=VALUE",
                    help="a setting for every row, e.g. model.head_init=zero: every fine-tuning row from a zero head "
                         "(the linear probe and LP-FT keep their probe start)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=600, help="optimizer steps per run (GMixout: 30 episodes)")
    ap.add_argument("--image-size", type=int, default=96)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "pacs")
    ap.add_argument("--work", type=Path, default=ROOT / "runs" / "pacs")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--dry-run", action="store_true", help="print each source's plan and estimated time")
    ap.add_argument("--report", action="store_true", help="only the pooled report from the per-source JSONs")
    ap.add_argument("--publish", action="store_true",
                    help="only publish each source's runs so far (same arguments as the running benchmark, whose "
                         "commit it records): a long benchmark's progress can be committed while it runs")
    args = ap.parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else argv
    args.variants = list(VARIANTS) if args.variants is None else args.variants
    args.grids = list(GRIDS) if args.grids is None else args.grids
    if args.levers:
        args.variants += [v for v in LEVERS if v not in args.variants]
        args.grids += [g for g in LEVER_GRIDS if g not in args.grids]
    args.commit = git_head()  # at the start: the code that trained, even if the tree moves on meanwhile
    if args.publish:
        for source in args.sources.split(","):
            publish(args, source)
        return 0
    if not args.report:
        for source in args.sources.split(","):
            run_source(args, source)
    if not args.dry_run:
        write_pooled(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
