"""Evaluation (`srd eval`): benchmarks by name, each model's answers scored and summarised,
resumable per benchmark and seed."""

from srd.eval.benchmarks import resolve_benchmark
from srd.eval.evaluate import evaluate, load_example_scores

__all__ = ["evaluate", "load_example_scores", "resolve_benchmark"]
