"""Evaluation: in-domain and out-of-domain top-1."""

from gmixout_cli.eval.accuracy import autocast, evaluate_domains, ood_sets, top1

__all__ = ["autocast", "evaluate_domains", "ood_sets", "top1"]
