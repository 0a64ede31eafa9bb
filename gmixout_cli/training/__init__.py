"""The training loop and run folders."""

from gmixout_cli.training.loop import Trainer, input_size, make_trainer
from gmixout_cli.training.pipeline import finetune
from gmixout_cli.training.runs import RunFolder, latest_run, open_run, read_run_config

__all__ = [
    "RunFolder", "Trainer", "finetune", "input_size", "latest_run", "make_trainer", "open_run", "read_run_config",
]
