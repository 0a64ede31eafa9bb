"""`gmixout finetune`: train with a recipe, export merged dense weights, evaluate in and out of domain."""

from __future__ import annotations

import typer
import yaml
from rich.syntax import Syntax
from rich.table import Table

from gmixout_cli.cli.common import OVERRIDES_HELP, RECIPE_HELP, console, scores_table, split_csv


def register(app: typer.Typer) -> None:
    app.command(no_args_is_help=False)(finetune)


def finetune(
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP, metavar="[KEY=VALUE]...", show_default=False),
    recipe: str = typer.Option(None, "--recipe", "-r", help=RECIPE_HELP, show_default=False),
    model: str = typer.Option(None, "--model", "-m", help="Shortcut for model.name (see [cyan]gmixout models[/]).",
                              show_default=False),
    data: str = typer.Option(None, "--data", "-d", help="Shortcut for data.root: ROOT/DOMAIN, an ImageFolder domain.",
                             show_default=False),
    ood: str = typer.Option(None, "--ood", help="Comma-separated sibling domains to evaluate (default: all siblings).",
                            show_default=False),
    out: str = typer.Option(None, "--out", "-o", help="Run folder to create (default: a new folder under runs/).",
                            show_default=False),
    resume: str = typer.Option(None, "--resume", help="Continue a stopped run from its checkpoint: a run folder, "
                               "or [cyan]auto[/]: with --out, that folder's run (a fresh start if it holds none), "
                               "else the latest unfinished run under runs/.", show_default=False),
) -> None:
    """Fine-tune a model on one domain, then evaluate it on its sibling domains.

    The run folder gets config.yaml (the resolved config), metrics.jsonl, model.safetensors (the merged,
    dense classifier under the library's own parameter names) and results.json.

    Examples:

      gmixout finetune --recipe quickstart

      gmixout finetune --model vit_b16_clip --data ./domainnet/sketch --ood painting,clipart

      gmixout finetune -r full -d ./pacs/photo train.epochs=3 train.lr=1e-5 train.checkpoint_every=500

      gmixout finetune --resume auto --out runs/job42   # a requeued cluster job: continue or start

    A stop signal (SIGINT, SIGTERM, SIGHUP) finishes the current step, writes a checkpoint and exits
    with 128 + the signal's number; --resume continues from it.

    Several GPUs or nodes: `torchrun --nproc_per_node N -m gmixout_cli finetune ...` (train.batch_size
    stays the global batch; rank 0 writes the run folder, which every node must see).
    """
    from gmixout_cli.training.distributed import process_group

    shortcuts = {"model.name": model, "data.root": data, "data.ood": split_csv(ood)}
    with process_group() as dist:
        if dist.main:
            _finetune(resume, out, recipe, overrides or [], shortcuts, dist)
        else:
            _follow(dist)


def _finetune(resume: str | None, out: str | None, recipe: str | None, overrides: list[str],
              shortcuts: dict, dist) -> None:  # noqa: ANN001 - a Dist
    from gmixout_cli.config import config_to_dict
    from gmixout_cli.training import finetune as run_finetune
    from gmixout_cli.training import open_run
    from gmixout_cli.utils.memory import oom_advice

    shared = False
    try:
        with open_run(resume, out, recipe, overrides, shortcuts) as run:
            cfg = run.cfg
            # the other ranks train in the folder rank 0 claimed, with its config (one process: a no-op)
            shared = dist.share((str(run.path), config_to_dict(cfg), run.resume)) is not None
            resolved = yaml.safe_dump(config_to_dict(cfg), sort_keys=False)
            console.print(f"[bold]{'resuming' if run.resume else 'run folder'}[/] {run.path}")
            console.print(Syntax(resolved, "yaml", theme="ansi_dark", background_color="default"))
            with oom_advice(cfg.train.batch_size, cfg.train.micro_batch_size):
                results = run_finetune(cfg, run.path, console, resume=run.resume, dist=dist)
    except BaseException:
        if not shared:
            dist.share(None)  # the other ranks stop too, instead of waiting for a run that will not start
        raise
    run_dir = run.path
    console.print(scores_table(f"{cfg.model.name} / {cfg.method.name}", results))
    summary = Table(title="run", show_header=False)
    summary.add_column("what")
    summary.add_column("value")
    summary.add_row("training time", f"{results['train_time_s']:.1f} s for {results['steps']} steps")
    summary.add_row("throughput", f"{results['images_per_s']:.1f} images/s")
    summary.add_row("peak memory", f"{results['peak_memory_bytes'] / 2**30:.2f} GiB ({results['device']})")
    summary.add_row("merged model", str(run_dir / "model.safetensors"))
    summary.add_row("results, metrics", f"{run_dir / 'results.json'}, {run_dir / 'metrics.jsonl'}")
    console.print(summary)


def _follow(dist) -> None:  # noqa: ANN001 - a Dist
    """A rank other than 0: train in the run folder rank 0 opened, with its config; print nothing."""
    from pathlib import Path

    from rich.console import Console

    from gmixout_cli.config import build_saved_config
    from gmixout_cli.errors import Interrupted, UserError
    from gmixout_cli.training import finetune as run_finetune

    given = dist.share(None)
    if given is None:
        raise UserError(f"rank {dist.rank}: rank 0 did not start the run (its message says why)")
    path, cfg_dict, resume = given
    try:
        run_finetune(build_saved_config(cfg_dict), Path(path), Console(quiet=True), resume=resume, dist=dist)
    except Interrupted as exc:  # every rank stopped after the same step; rank 0 says where its checkpoint is
        raise SystemExit(exc.exit_code) from None

