"""Carry out a comparison: every run through the product's own `finetune`, WiSE-FT through its merge code.

Runs live in OUT/runs/<row>/<lr>-s<seed>/ as ordinary run folders. A finished run is reused, a run
stopped with a checkpoint continues from it, so running the same command again continues a comparison
where it stopped. The report is rewritten after every run, so a cut-off comparison still shows what
it has.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from rich.console import Console

from gmixout_cli.compare.plan import Plan, Row, RunKey, extend, run_dir, stale_keys
from gmixout_cli.compare.progress import PlanProgress
from gmixout_cli.compare.report import ood_mean
from gmixout_cli.config import Config, read_yaml
from gmixout_cli.data import build_transform, load_domain, sibling_domains, verify_domain_data
from gmixout_cli.errors import Diverged, Interrupted, UserError
from gmixout_cli.eval import evaluate_domains, ood_sets
from gmixout_cli.merge import initial_state, interpolate, load_weights
from gmixout_cli.models import load_classifier
from gmixout_cli.training import finetune, open_run
from gmixout_cli.utils.io import write_json
from gmixout_cli.utils.memory import resolve_device

Results = dict[str, Any]


def planned_steps(cfg: Config) -> int:
    """Optimizer steps of one run (as the pipeline counts them), from the training split's size."""
    n = len(load_domain(cfg.data).train)
    per_epoch = n // cfg.train.batch_size if n > cfg.train.batch_size else 1
    total = cfg.train.epochs * per_epoch
    return min(total, cfg.train.max_steps or total)


class Comparison:
    """Runs a plan in OUT; `report(state)` is called after every finished run."""

    def __init__(self, plan: Plan, out: Path, console: Console, report: Callable[[dict[str, Any]], None]) -> None:
        self.plan, self.out, self.console, self.report = plan, out, console, report
        self.steps = planned_steps(plan.config(plan.rows[0], plan.rows[0].grid[0], plan.seeds[0]))
        self.results: dict[tuple[str, float, int], Results] = {}
        self.grids: dict[str, list[float]] = {r.label: list(r.grid) for r in plan.rows}
        self.selected: dict[str, float] = {}
        self.chosen: dict[str, str] = {}  # family -> its member chosen on the held-out split
        self.wise: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._eval_data: tuple[Any, Any] | None = None
        self.progress = PlanProgress(console, self.steps)
        self.complete = False  # every planned run finished: a report written before that is partial

    def todo(self) -> list[tuple[Row, RunKey]]:
        """Every run the plan names now (grids as extended so far), in execution order."""
        first = [(r, RunKey(r.label, v, self.plan.seeds[0])) for r in self.plan.rows for v in self.grids[r.label]]
        rest = [(r, RunKey(r.label, self.later_value(r, s), s))
                for s in self.plan.seeds[1:] for r in self.plan.rows if self.runs_every_seed(r.label)]
        return first + rest

    def later_value(self, row: Row, seed: int) -> float:
        """The value a later seed runs at: the kept one; before the choice, that of a finished run of the seed in
        OUT (a continuing comparison), else the grid's middle (the count is the same)."""
        if row.label in self.selected:
            return self.selected[row.label]
        prefix = row.key.rsplit(".", 1)[-1]
        for done in sorted((self.out / "runs" / row.label).glob(f"{prefix}*-s{seed}/results.json")):
            try:
                return float(done.parent.name[len(prefix):].rsplit("-s", 1)[0])
            except ValueError:  # a folder of another naming: not counted
                continue
        return row.grid[len(row.grid) // 2]

    def runs_every_seed(self, label: str) -> bool:
        """A row outside any family, or its family's chosen member (before the choice: the first, for counting)."""
        for name, members in self.plan.families.items():
            if label in members:
                return label == self.chosen.get(name, members[0])
        return True

    def choose_families(self) -> None:
        """Each family's member with the best held-out score at the first seed (ties: the first listed)."""
        for name, members in self.plan.families.items():
            scores = {m: self._held_out(self.results[(m, self.selected[m], self.plan.seeds[0])]) for m in members}
            self.chosen[name] = max(members, key=lambda m: (scores[m], -members.index(m)))
            self.console.print(f"family [yellow]{name}[/]: {self.chosen[name]} chosen on the held-out split ("
                               + ", ".join(f"{m} {v:.3f}" for m, v in scores.items()) + ")")

    def run(self) -> dict[str, Any]:
        with self.progress:
            self.progress.plan([self.finished(r, k) for r, k in self.todo()])
            # WiSE-FT right after a kept run: its curve is cached beside it, so its weights may go afterwards
            for row in self.plan.rows:  # phase 1: the grid at the first seed, grown past an edge choice
                for value in list(self.grids[row.label]):
                    self.train(row, RunKey(row.label, value, self.plan.seeds[0]))
                self.select(row)
                if self.plan.gets_wise(row.label):
                    self.wise_curve(row, self.plan.seeds[0])
            self.choose_families()
            for seed in self.plan.seeds[1:]:  # phase 2: the other seeds at the kept value
                for row in [r for r in self.plan.rows if self.runs_every_seed(r.label)]:
                    self.train(row, RunKey(row.label, self.selected[row.label], seed))
                    if self.plan.gets_wise(row.label):
                        self.wise_curve(row, seed)
        self.complete = True
        state = self.state()
        self.report(state)
        return state

    def finished(self, row: Row, key: RunKey) -> bool:
        return (run_dir(self.out, row, key) / "results.json").is_file()

    def select(self, row: Row) -> None:
        """Keep the best held-out value; while it is at a grid edge, grow the grid past it."""
        for _ in range(self.plan.max_extensions + 1):
            grid = sorted(self.grids[row.label])
            scores = {v: self._held_out(self.results[(row.label, v, self.plan.seeds[0])]) for v in grid}
            if max(scores.values()) < 0:
                raise UserError(f"every {row.key} of row {row.label} diverged ({', '.join(f'{v:g}' for v in grid)}): "
                                f"give --grid {row.label}=... with lower values")
            tied = [v for v in grid if scores[v] == max(scores.values())]
            best = tied[(len(tied) - 1) // 2]  # a plateau: its middle (an edge only when the edge alone is best)
            self.selected[row.label] = best
            if best not in (grid[0], grid[-1]):
                return
            new = extend(grid, upward=best == grid[-1])
            if not 0 < new < 1 or len(self.grids[row.label]) - len(row.grid) >= self.plan.max_extensions:
                return  # reported as "at the grid's edge" in the table
            self.console.print(f"[yellow]{row.label}[/]: best {row.key}={best:g} is at the grid's edge; "
                               f"adding {new:g}")
            self.grids[row.label].append(new)
            key = RunKey(row.label, new, self.plan.seeds[0])
            self.progress.add_runs(1, finished=self.finished(row, key))
            self.train(row, key)

    def train(self, row: Row, key: RunKey) -> Results:
        """One run through the product's finetune (reused when finished, continued when checkpointed)."""
        if (key.label, key.value, key.seed) in self.results:
            return self.results[(key.label, key.value, key.seed)]
        cfg = self.plan.config(row, key.value, key.seed)
        path = run_dir(self.out, row, key)
        if (path / "config.yaml").is_file():
            changed = stale_keys(read_yaml(path / "config.yaml"), cfg)
            if changed:
                raise UserError(f"{path} was trained with other settings than this comparison "
                                f"({', '.join(changed[:3])}): use another --out, or remove that folder")
        done, diverged = path / "results.json", path / "diverged.json"
        if diverged.is_file():  # a grid value too high for this row: a result of the search, never selected
            results = {"diverged": json.loads(diverged.read_text())["error"], "id": {}, "ood": {}, "ood_avg": None}
            self.results[(key.label, key.value, key.seed)] = results
            self.console.print(f"{row.label} {row.key.split('.')[-1]}={key.value:g} seed {key.seed}: diverged")
            return results
        if not done.is_file():
            self.progress.start_run(f"{row.label} {row.key.split('.')[-1]}={key.value:g} seed {key.seed}")
            path.parent.mkdir(parents=True, exist_ok=True)
            # the run's own console output, beside its folder (a run folder holds only what the run writes)
            with open(path.parent / f"{path.name}.log", "a") as log, warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    with open_run("auto", str(path), self.plan.recipe, self._overrides(row, key), {}) as run:
                        finetune(run.cfg, run.path, Console(file=log, width=120), resume=run.resume,
                                 on_step=self.progress.step)
                except Diverged as exc:
                    write_json(diverged, {"error": str(exc)})
                    self.progress.end_run()
                    return self.train(row, key)
                except Interrupted as exc:  # the run kept what it can; the comparison resumes it
                    said = str(exc).split("; resume with")[0].split(": run the same command")[0]
                    raise Interrupted(f"{said}; run the same `gmixout compare` "
                                      "command again to continue the comparison", exc.exit_code) from None
                for w in caught:
                    log.write(f"warning: {w.message}\n")
            self.progress.end_run()
        results = json.loads(done.read_text())
        self.results[(key.label, key.value, key.seed)] = results
        self.console.print(f"{row.label} {row.key.split('.')[-1]}={key.value:g} seed {key.seed}: held-out "
                           f"{self._held_out(results):.3f}, out-of-domain mean "
                           f"{ood_mean(results['ood'], self.plan.id_test):.3f}"
                           f"{self.progress.eta_note()}")
        self.report(self.state())
        return results

    def _overrides(self, row: Row, key: RunKey) -> list[str]:
        return [*self.plan.shared, *row.overrides, f"{row.key}={key.value!r}", f"train.seed={key.seed}"]

    @staticmethod
    def _held_out(results: Results) -> float:
        return float(next(iter(results["id"].values()))) if results["id"] else -1.0  # diverged: below any score

    def wise_curve(self, row: Row, seed: int) -> list[dict[str, Any]]:
        """WiSE-FT between the run's start and its result at every alpha, scored like the runs (cached)."""
        key = RunKey(row.label, self.selected[row.label], seed)
        path = run_dir(self.out, row, key)
        cache = path / "wise.json"
        alphas = sorted(set(self.plan.alphas))
        if cache.is_file():
            curve = json.loads(cache.read_text())
            if [c["alpha"] for c in curve] == alphas:
                self.wise[(row.label, seed)] = curve
                return curve
        if not (path / "model.safetensors").is_file():  # e.g. a run restored from a report's small files
            raise UserError(f"{path} has its results but not its weights (model.safetensors), which WiSE-FT on "
                            f"{row.label} needs: remove that folder and run the same command to train it again")
        self.progress.start_run(f"WiSE-FT {row.label} seed {seed}")
        tuned, meta = load_weights(path / "model.safetensors")
        base = initial_state(path, meta)
        model, _ = load_classifier(path / "model.safetensors")
        data, ood = self._evaluation_sets()
        device = resolve_device("auto")
        model.to(device)
        tf = build_transform(int(meta["image_size"]), json.loads(meta["mean"]), json.loads(meta["std"]), train=False)
        cfg = self.plan.config(row, key.value, seed)
        curve = []
        for alpha in alphas:
            if alpha == 1.0:
                scores = {k: self.results[(row.label, key.value, seed)][k] for k in ("id", "ood", "ood_avg")}
            else:
                model.load_state_dict(interpolate(base, tuned, alpha))
                scores = evaluate_domains(model, data, ood, tf, cfg.train.eval_batch_size, cfg.data.num_workers,
                                          device)
            curve.append({"alpha": alpha, **scores})
        write_json(cache, curve)
        self.progress.end_run()
        self.wise[(row.label, seed)] = curve
        self.report(self.state())
        return curve

    def _evaluation_sets(self) -> tuple[Any, Any]:
        if self._eval_data is None:
            cfg = self.plan.config(self.plan.rows[0], self.plan.rows[0].grid[0], self.plan.seeds[0])
            data, _ = verify_domain_data(load_domain(cfg.data), cfg.data.unreadable, cfg.data.num_workers)
            ood, _ = ood_sets(data, sibling_domains(data, cfg.data.ood), cfg.data.unreadable, cfg.data.num_workers)
            self._eval_data = (data, ood)
        return self._eval_data

    def state(self) -> dict[str, Any]:
        """Everything the report needs, JSON-able."""
        return {
            "plan": {"recipe": self.plan.recipe, "shared": self.plan.shared, "seeds": self.plan.seeds,
                     "alphas": self.plan.alphas, "wise": self.plan.wise, "max_extensions": self.plan.max_extensions,
                     "id_test": self.plan.id_test, "steps_per_run": self.steps, "notes": self.plan.notes,
                     "rows": [{"label": r.label, "overrides": list(r.overrides), "key": r.key,
                               "initial_grid": list(r.grid)} for r in self.plan.rows]},
            "grids": {k: sorted(v) for k, v in self.grids.items()},
            "selected": dict(self.selected),
            "families": {name: {"members": members, "chosen": self.chosen.get(name)}
                         for name, members in self.plan.families.items()},
            "runs": [{"label": label, "value": value, "seed": seed, "dir": str(run_dir(
                self.out, self.plan.row(label), RunKey(label, value, seed)).relative_to(self.out)),
                      **{k: r.get(k) for k in ("id", "ood", "ood_avg", "steps", "train_time_s", "linear_probe",
                                               "method_summary", "device", "image_size", "diverged", "held_out_images")
                         if k in r}}
                     for (label, value, seed), r in sorted(self.results.items(), key=lambda i: (i[0][0], i[0][2],
                                                                                               i[0][1]))],
            "wise": [{"label": label, "seed": seed, "value": self.selected[label], "curve": curve}
                     for (label, seed), curve in sorted(self.wise.items())],
            "elapsed_s": self.progress.elapsed(),
            "device": str(resolve_device("auto")),
            "complete": self.complete,
        }
