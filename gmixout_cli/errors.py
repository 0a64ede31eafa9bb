"""The one exception type that reaches the user as a one-line message and exit code 2."""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix: bad path, bad recipe key, unknown model, corrupt image...

    The message names the problem and the fix on one line; the CLI prints it without a traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class Interrupted(UserError):
    """Training stopped on a signal after writing a checkpoint."""

    exit_code = 130
