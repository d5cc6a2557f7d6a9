"""Text metrics. ROUGE-L is rouge-score's rougeL F-measure with Porter stemming, x100,
maximised over references (the KD literature's protocol, docs/method.md, section 5)."""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache


@lru_cache(maxsize=1)
def _rouge_scorer():  # type: ignore[no-untyped-def]
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: str | Sequence[str]) -> float:
    """ROUGE-L F x100 of one prediction against one or more references (max over them)."""
    refs = [references] if isinstance(references, str) else list(references)
    if not refs:
        raise ValueError("rouge_l needs at least one reference")
    scorer = _rouge_scorer()
    return 100.0 * max(scorer.score(ref, prediction)["rougeL"].fmeasure for ref in refs)


def corpus_bleu(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (sacrebleu defaults: 13a tokenisation, exponential smoothing).

    `references[i]` holds the references of prediction i (any number per prediction).
    """
    import sacrebleu

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    n_refs = max(len(r) for r in references)
    # sacrebleu wants one stream per reference position; pad short lists with their first item
    streams = [[refs[k] if k < len(refs) else refs[0] for refs in references] for k in range(n_refs)]
    return float(sacrebleu.corpus_bleu(list(predictions), streams).score)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
