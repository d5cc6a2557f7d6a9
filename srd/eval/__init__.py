"""Evaluation: generation and metrics (the dev ROUGE-L used for checkpoint selection)."""

from srd.eval.generate import cut_at_stop, generate_responses
from srd.eval.metrics import mean, rouge_l

__all__ = ["cut_at_stop", "generate_responses", "mean", "rouge_l"]
