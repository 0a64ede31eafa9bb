"""The training loop and run folders."""

from gmixout_cli.training.loop import Trainer, finetune, input_size, make_trainer
from gmixout_cli.training.runs import latest_run, new_run_dir, read_run_config, resume_run

__all__ = [
    "Trainer", "finetune", "input_size", "latest_run", "make_trainer", "new_run_dir", "read_run_config", "resume_run",
]
