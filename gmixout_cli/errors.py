"""The exception types that reach the user as a one-line message and a chosen exit code."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad path, bad recipe key, unknown model, corrupt image...

    The message names the problem and the fix on one line; the CLI prints it without a traceback.
    """

    exit_code = 2
    label = "error"

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Diverged(UserError):
    """Training produced a non-finite loss (a learning rate too high, or bf16 overflow)."""


class Interrupted(UserError):
    """A run stopped on a signal (after writing a checkpoint where there was progress to keep).

    The exit code is the shell's for that signal, 128 + its number: 130 for SIGINT, 143 for SIGTERM,
    129 for SIGHUP, so schedulers and scripts can tell a stop from a failure (1) or a user error (2).
    """

    label = ""  # the message says "stopped by ..." itself

    def __init__(self, message: str, exit_code: int = 130) -> None:
        super().__init__(message)
        self.exit_code = exit_code
