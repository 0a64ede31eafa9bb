"""Memory and speed profiling of a recipe."""

from gmixout_cli.profiling.profile import profile

__all__ = ["profile"]
