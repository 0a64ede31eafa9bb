"""The `gmixout` command: a Typer app, one file per subcommand.

    gmixout finetune --recipe quickstart
    gmixout evaluate --json
"""

from __future__ import annotations

import errno
import sys
import warnings

import typer

from gmixout_cli.cli import compare, evaluate, finetune, merge, profile, recipes
from gmixout_cli.cli.common import err_console
from gmixout_cli.errors import UserError
from gmixout_cli.utils.signals import is_worker_loss

DISK_ERRORS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)  # the disk, not the program: one line, no traceback

app = typer.Typer(
    name="gmixout",
    help="Fine-tune vision foundation models for in-domain accuracy without losing robustness (GMixout).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
for module in (finetune, evaluate, merge, profile, compare, recipes):
    module.register(app)


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    err_console.print(f"[yellow]warning:[/] {message}", highlight=False, soft_wrap=True)


def main() -> None:
    """Console entry point: user errors become one line on stderr and exit code 2."""
    warnings.showwarning = _show_warning  # data notes (e.g. a typo in a split list) as one readable line
    try:
        app()
    except UserError as exc:
        label = f"[bold red]{exc.label}:[/] " if exc.label else ""
        err_console.print(f"{label}{exc}", highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err_console.print("[bold red]interrupted[/]")
        sys.exit(130)
    except RuntimeError as exc:  # a loader worker killed on its own (finetune explains its own)
        if not is_worker_loss(exc):
            raise
        err_console.print("[bold red]error:[/] a data loader worker exited unexpectedly (killed: out of memory?): "
                          "run the command again with fewer workers (--workers N, or data.num_workers=N); files "
                          "already written are intact", highlight=False, soft_wrap=True)
        sys.exit(2)
    except OSError as exc:
        if exc.errno not in DISK_ERRORS:
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        err_console.print(f"[bold red]error:[/] {exc.strerror}{where}: free space (or choose another --out) and "
                          "run the command again; files already written are intact", highlight=False, soft_wrap=True)
        sys.exit(2)
