"""`python -m gmixout_cli` is the `gmixout` command."""

from gmixout_cli.cli.app import main

main()
