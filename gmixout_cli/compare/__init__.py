"""`gmixout compare`: methods side by side on one domain, selection on held-out in-domain data only."""

from gmixout_cli.compare.plan import Plan, Row, RunKey, build_plan
from gmixout_cli.compare.report import compare_command, write_report
from gmixout_cli.compare.runner import Comparison

__all__ = ["Comparison", "Plan", "Row", "RunKey", "build_plan", "compare_command", "write_report"]
