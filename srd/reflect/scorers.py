"""Reflection scorers: how easy an example is for the student, by name.

A scorer is a pure function `(example, student_output, student_stats) -> float` that
declares whether a higher value means easier. `student_stats` holds what reflection
measured with the student (see `srd.reflect.reflect.sequence_stats`):

    ce          mean per-token cross-entropy of the scored target (the reference by default,
                the student's own output with reflect.ce_target=student_output)
    entropy     mean predictive entropy of the student over the reference tokens
    ref_tokens  number of reference tokens (+ EOS)
    teacher_ce  the teacher's mean cross-entropy on the reference; measured (one teacher forward
                per row, no generation) only when a scorer declares needs_teacher

Scorers relative to the teacher (beyond the paper): raw difficulty drops the rows that are hard
for any model (open-ended prompts with long references) together with the rows the student can
still learn. `teacher_ce` ranks the rows the teacher itself cannot do as the hardest, so they are
the ones dropped; `ce_gap` (student CE minus teacher CE) measures how far the student is from
the teacher on a row rather than how hard the row is.

Verifiable scorers (beyond the paper, which names this as its limitation: ROUGE-L and CE
cannot tell a functionally wrong answer from a right one):

    answer_match  100 if the student's final answer equals the reference's (GSM8K-style
                  extraction: \boxed{}, then `####`, then the last number), else 0
    tests_pass    100 x the fraction of the task's asserts (meta.test_list) that the
                  student's code passes, run in the evaluation sandbox

A scorer may also check the reference itself (`reference_ok`): a GSM8K row without an
extractable answer, an MBPP row whose reference code fails its own asserts. Reflection
reports such rows and, with reflect.drop_invalid_references (default), never keeps them.
New scorers register here by name and plug into fusion without any change to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from srd.config import ConfigError
from srd.data.example import Example
from srd.metrics.text import rouge_l

ScoreFn = Callable[[Example, str, dict[str, Any]], float]
RefCheck = Callable[[Example], bool]

# wall-clock limit per program for tests_pass (a hanging answer scores 0, it never stalls reflection)
TESTS_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Scorer:
    name: str
    fn: ScoreFn
    higher_is_easier: bool
    needs_generation: bool  # whether the student must answer the prompt first
    description: str = ""
    reference_ok: RefCheck | None = None  # does the reference itself pass this scorer's check?
    # "ordinal": ties broken by id (the reference code's stable sort; right for continuous
    # scores); "average": tied examples share their mean rank, so a pass/fail scorer adds
    # nothing between two examples it cannot tell apart (srd.reflect.fusion.ranks)
    ties: str = "ordinal"
    needs_teacher: bool = False  # whether reflection must measure the teacher's CE (stats["teacher_ce"])
    runs_code: bool = False  # executes model-written or data-supplied code (needs allow_code_execution)


SCORERS: dict[str, Scorer] = {}


def register_scorer(
    name: str,
    fn: ScoreFn,
    *,
    higher_is_easier: bool,
    needs_generation: bool,
    description: str = "",
    reference_ok: RefCheck | None = None,
    ties: str = "ordinal",
    needs_teacher: bool = False,
    runs_code: bool = False,
) -> None:
    if name in SCORERS:
        raise ValueError(f"scorer {name!r} is already registered")
    if ties not in ("ordinal", "average"):
        raise ValueError(f"ties must be 'ordinal' or 'average', got {ties!r}")
    SCORERS[name] = Scorer(
        name, fn, higher_is_easier, needs_generation, description, reference_ok, ties, needs_teacher, runs_code
    )


def needs_teacher(names: Sequence[str]) -> bool:
    """Whether any of these scorers reads the teacher's statistics."""
    return any(get_scorer(n).needs_teacher for n in names)


def check_scorers(names: Sequence[str], *, allow_code_execution: bool = False) -> None:
    """reflect.scorers names registered scorers (a ConfigError naming the valid ones otherwise),
    and a scorer that runs code only when allowed (srd.metrics.sandbox.require_code_execution)."""
    from srd.metrics.sandbox import CodeExecutionRefused, require_code_execution

    for name in names:
        if name not in SCORERS:
            raise ConfigError(f"reflect.scorers: {name!r} is not registered; choose from {sorted(SCORERS)}")
        if SCORERS[name].runs_code:
            try:
                require_code_execution(allow_code_execution, f"reflect.scorers {name}")
            except CodeExecutionRefused as e:
                raise ConfigError(str(e)) from None


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


register_scorer(
    "teacher_ce",
    lambda ex, out, stats: float(stats["teacher_ce"]),
    higher_is_easier=False,
    needs_generation=False,
    needs_teacher=True,
    description="the teacher's mean per-token cross-entropy on the reference: rows the teacher cannot do rank hardest",
)
register_scorer(
    "ce_gap",
    lambda ex, out, stats: float(stats["ce"]) - float(stats["teacher_ce"]),
    higher_is_easier=False,
    needs_generation=False,
    needs_teacher=True,
    description="the student's CE minus the teacher's on the reference: how far the student is from the teacher",
)


# --- verifiable scorers ---------------------------------------------------------------


def _answer_match(ex: Example, out: str, stats: dict[str, Any]) -> float:
    from srd.metrics.answers import answers_match

    return 100.0 * answers_match(out, ex.target)


def _answer_reference_ok(ex: Example) -> bool:
    from srd.metrics.answers import extract_answer

    return extract_answer(ex.target) is not None


def _tests(ex: Example) -> tuple[list[str], str]:
    return list(ex.meta.get("test_list") or []), str(ex.meta.get("test_setup_code") or "")


def _tests_pass(ex: Example, out: str, stats: dict[str, Any]) -> float:
    from srd.metrics.sandbox import defined_names, extract_code, run_tests

    tests, setup = _tests(ex)
    if not tests:
        return float("nan")  # nothing to check: ranks as the hardest
    names = defined_names(extract_code(ex.target))  # what the reference defines: the names its tests call
    result = run_tests(extract_code(out), tests, setup=setup, timeout_s=TESTS_TIMEOUT_S, entry_points=names)
    return 100.0 * result.passed / result.total


def _tests_reference_ok(ex: Example) -> bool:
    from srd.metrics.sandbox import defined_names, extract_code, run_tests

    tests, setup = _tests(ex)
    code = extract_code(ex.target)
    return (
        bool(tests)
        and run_tests(code, tests, setup=setup, timeout_s=TESTS_TIMEOUT_S, entry_points=defined_names(code)).all_passed
    )


register_scorer(
    "answer_match",
    _answer_match,
    higher_is_easier=True,
    needs_generation=True,
    description="100 if the student's final answer equals the reference's (\\boxed{}, ####, last number), else 0",
    reference_ok=_answer_reference_ok,
    ties="average",
)
register_scorer(
    "tests_pass",
    _tests_pass,
    higher_is_easier=True,
    needs_generation=True,
    description="100 x the fraction of the task's asserts the student's code passes (sandboxed)",
    reference_ok=_tests_reference_ok,
    ties="average",
    runs_code=True,
)
