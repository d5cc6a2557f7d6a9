"""What an average score hides: answer lengths, and the score by reference length and by topic.

A method can gain ROUGE-L on a set of short references by writing shorter answers, and lose it
on long open-ended prompts; one mean per benchmark cannot show that. This module reads the
per-example files an evaluation wrote (`<benchmark>/greedy.jsonl | seed-<S>.jsonl`: id,
prediction, score) next to the benchmark's rows and splits them:

    answer_words(eval_dir, bench)      mean words of each example's answer (over the seeds)
    example_scores(eval_dirs, bench)   per-example score averaged over decoding and training seeds
    groups(examples)                   example id -> its groups: all, reference-length bucket,
                                       and the row's `topic` / `category` where the data has one
    length_summary(...)                per model: mean and median answer words against the
                                       references', and the share of answers caught in a loop
    breakdown(...)                     per group: both models' mean score and answer words, and
                                       their per-example scores for a paired test

Words are whitespace-separated tokens: the unit ROUGE-L's tokeniser is close to, and one a
reader can check by hand.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srd.data.example import Example
from srd.eval.evaluate import answer_files, load_example_scores

# reference-length buckets in words (upper bounds inclusive; None: no bound). On DollyEval they
# hold 95 / 145 / 122 / 138 of the 500 rows (median reference 33 words, mean 72)
# a benchmark's rows are split by topic only when it has at most this many (DollyEval: 8)
MAX_TOPICS = 12

LENGTH_BUCKETS: tuple[tuple[int, int | None], ...] = ((0, 10), (11, 30), (31, 80), (81, None))


# an answer "loops" when fewer than this share of its word 4-grams are distinct (at least
# LOOP_MIN_WORDS words): it repeats itself until the token limit cuts it, so its length says how
# long the limit is, not how long the model meant to write. Such answers pull a mean length up
# (on DollyEval a KD student's looping answers are 1 in 6 and about three times the median length)
LOOP_DISTINCT = 0.6
LOOP_MIN_WORDS = 12


def words(text: str) -> int:
    return len(text.split())


def loops(text: str) -> bool:
    """Whether an answer repeats itself: fewer than LOOP_DISTINCT of its word 4-grams distinct."""
    w = text.split()
    if len(w) < LOOP_MIN_WORDS:
        return False
    grams = [tuple(w[i : i + 4]) for i in range(len(w) - 3)]
    return len(set(grams)) < LOOP_DISTINCT * len(grams)


def bucket_label(n_words: int) -> str:
    for low, high in LENGTH_BUCKETS:
        if n_words >= low and (high is None or n_words <= high):
            return f"reference {low}-{high} words" if high is not None else f"reference > {low - 1} words"
    raise ValueError(f"negative word count {n_words}")


def _rows(eval_dir: Path, bench: str) -> list[dict[str, Any]]:
    rows = []
    for path in answer_files(Path(eval_dir), bench):
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def answer_words(eval_dir: Path | Sequence[Path], bench: str) -> dict[str, float]:
    """Example id -> the mean number of words of its answers (one per seed, or the greedy one),
    over one evaluation folder or several (one per training seed)."""
    per: dict[str, list[int]] = {}
    for folder in _folders(eval_dir):
        for row in _rows(folder, bench):
            per.setdefault(row["id"], []).append(words(row.get("prediction", "")))
    return {k: statistics.fmean(v) for k, v in per.items()}


def example_scores(eval_dir: Path | Sequence[Path], bench: str) -> dict[str, float]:
    """Example id -> its score averaged over the decoding seeds and, given several folders (one
    per training seed), over those too: the per-example score a paired test across seeds uses.
    Only ids every folder scored are kept."""
    per = [load_example_scores(folder, bench) for folder in _folders(eval_dir)]
    ids = set.intersection(*(set(p) for p in per)) if per else set()
    return {i: statistics.fmean(p[i] for p in per) for i in sorted(ids)}


def _folders(eval_dir: Path | Sequence[Path]) -> list[Path]:
    return [Path(eval_dir)] if isinstance(eval_dir, (str, Path)) else [Path(f) for f in eval_dir]


def reference_words(ex: Example) -> int:
    """Words of the example's first reference (the one training uses)."""
    return words(ex.target)


def groups(examples: Sequence[Example]) -> dict[str, list[str]]:
    """Group name -> the ids in it: `all`, one per reference-length bucket (in bucket order), and
    `topic <t>` for every topic or category the rows carry (DollyEval's topic, for example),
    when there are at most MAX_TOPICS of them."""
    out: dict[str, list[str]] = {"all": [ex.id for ex in examples]}
    for low, _ in LENGTH_BUCKETS:
        label = bucket_label(low)
        ids = [ex.id for ex in examples if bucket_label(reference_words(ex)) == label]
        if ids:
            out[label] = ids
    topics: dict[str, list[str]] = {}
    for ex in examples:
        topic = ex.meta.get("topic") or ex.meta.get("category")
        if isinstance(topic, str) and topic:
            topics.setdefault(f"topic {topic}", []).append(ex.id)
    if len(topics) > MAX_TOPICS:  # SelfInst names an app per row: groups of 1-10 rows say nothing
        return out
    return out | dict(sorted(topics.items()))


def length_summary(eval_dir: Path | Sequence[Path], bench: str, examples: Sequence[Example]) -> dict[str, float]:
    """One model on one benchmark: mean answer words, mean reference words (over the same rows),
    their ratio, the share of answers shorter than their reference, the median answer words (each
    row's answer words averaged over the seeds first), and the share of all answers (every seed's)
    that loop (`loops`)."""
    answers = answer_words(eval_dir, bench)
    refs = {ex.id: reference_words(ex) for ex in examples if ex.id in answers}
    if not refs:
        return {"n": 0}
    mean_answer = statistics.fmean(answers[i] for i in refs)
    mean_ref = statistics.fmean(refs.values())
    texts = [row.get("prediction", "") for f in _folders(eval_dir) for row in _rows(f, bench) if row["id"] in refs]
    return {
        "n": len(refs),
        "answer_words": mean_answer,
        "median_answer_words": statistics.median(answers[i] for i in refs),
        "reference_words": mean_ref,
        "ratio": mean_answer / mean_ref if mean_ref else float("nan"),
        "shorter_share": sum(answers[i] < refs[i] for i in refs) / len(refs),
        "loop_share": sum(map(loops, texts)) / len(texts),
    }


def breakdown(
    reference: Path | Sequence[Path], candidate: Path | Sequence[Path], bench: str, examples: Sequence[Example]
) -> list[dict[str, Any]]:
    """Two evaluations (folders holding `<bench>/*.jsonl`; a list of folders: one model trained
    with several seeds) of the same benchmark, per group of `groups(examples)`: n, the mean
    reference words, each model's mean answer words and mean score, and under "pairs" each
    model's per-example scores (`example_scores`) on the group's rows, for a paired test by the
    caller."""
    a, b = example_scores(reference, bench), example_scores(candidate, bench)
    wa, wb = answer_words(reference, bench), answer_words(candidate, bench)
    refs = {ex.id: reference_words(ex) for ex in examples}
    out = []
    for name, ids in groups(examples).items():
        ids = [i for i in ids if i in a and i in b]
        if not ids:
            continue
        out.append(
            {
                "group": name,
                "n": len(ids),
                "reference_words": statistics.fmean(refs[i] for i in ids),
                "words": (statistics.fmean(wa[i] for i in ids), statistics.fmean(wb[i] for i in ids)),
                "score": (statistics.fmean(a[i] for i in ids), statistics.fmean(b[i] for i in ids)),
                "pairs": ({i: a[i] for i in ids}, {i: b[i] for i in ids}),
            }
        )
    return out
