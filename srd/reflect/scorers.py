"""Reflection scorers: how easy an example is for the student, by name.

A scorer is a pure function `(example, student_output, student_stats) -> float` that
declares whether a higher value means easier. `student_stats` holds what reflection
measured with the student (see `srd.reflect.reflect.sequence_stats`):

    ce          mean per-token cross-entropy of the scored target (the reference by default,
                the student's own output with reflect.ce_target=student_output)
    entropy     mean predictive entropy of the student over the reference tokens
    ref_tokens  number of reference tokens (+ EOS)

New scorers (code execution, math answer checks) register here by name and plug into
fusion without any change to it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from srd.data.example import Example
from srd.eval.metrics import rouge_l

ScoreFn = Callable[[Example, str, dict[str, Any]], float]


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: ScoreFn
    higher_is_easier: bool
    needs_generation: bool  # whether the student must answer the prompt first
    description: str = ""


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str, fn: ScoreFn, *, higher_is_easier: bool, needs_generation: bool, description: str = ""
) -> None:
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} is already registered")
    SCORERS[name] = Scorer(name, fn, higher_is_easier, needs_generation, description)


def get_scorer(name: str) -> Scorer:
    try:
        return SCORERS[name]
    except KeyError:
        raise KeyError(f"unknown scorer {name!r}; registered: {sorted(SCORERS)}") from None


register_scorer(
    "rouge_l",
    lambda ex, out, stats: rouge_l(out, ex.references),
    higher_is_easier=True,
    needs_generation=True,
    description="ROUGE-L F x100 of the student's answer vs the reference (max over references)",
)
register_scorer(
    "ce",
    lambda ex, out, stats: float(stats["ce"]),
    higher_is_easier=False,
    needs_generation=False,
    description="the student's mean per-token cross-entropy on the reference (SRD paper Eq. 4)",
)
register_scorer(
    "length",
    lambda ex, out, stats: float(stats["ref_tokens"]),
    higher_is_easier=False,
    needs_generation=False,
    description="reference length in tokens (traditional curriculum)",
)
register_scorer(
    "entropy",
    lambda ex, out, stats: float(stats["entropy"]),
    higher_is_easier=False,
    needs_generation=False,
    description="the student's mean predictive entropy over the reference (traditional curriculum)",
)
