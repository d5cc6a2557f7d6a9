"""Scores of answers against references, shared by reflection (its scorers) and evaluation:
ROUGE-L and BLEU (srd.metrics.text), final-answer extraction (srd.metrics.answers) and the
code sandbox (srd.metrics.sandbox)."""

from srd.metrics.answers import answers_match, extract_answer
from srd.metrics.text import corpus_bleu, mean, rouge_l

__all__ = ["answers_match", "corpus_bleu", "extract_answer", "mean", "rouge_l"]
