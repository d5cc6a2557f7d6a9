"""Verifiable reflection scorers (answer_match, tests_pass), reference checks, fusion of three scorers."""

from __future__ import annotations

import math

import pytest

import srd.reflect.scorers as scorers_mod
from srd.data.example import Example
from srd.reflect.reflect import build_manifest, summarize
from srd.reflect.scorers import get_scorer


def _math(answer: str, id_: str = "m") -> Example:
    return Example(id=id_, instruction="q", input="", output=f"Some steps.\n#### {answer}")


@pytest.mark.parametrize(
    "prediction,reference,expected",
    [
        ("so she pays $1,234.00 in total. \\boxed{1,234}", "1234", 100.0),
        ("The answer is 18 dollars.", "18", 100.0),
        ("He loses -7 points, so \\boxed{-7}", "-7", 100.0),
        ("It takes 2.50 hours", "2.5", 100.0),
        ("\\boxed{\\frac{1}{2}}", "0.5", 100.0),
        ("The answer is 17.", "18", 0.0),
        ("I do not know.", "18", 0.0),
    ],
)
def test_answer_match(prediction, reference, expected):
    assert get_scorer("answer_match").fn(_math(reference), prediction, {}) == expected


@pytest.fixture(autouse=True)
def _code_execution_allowed(monkeypatch):
    """These tests are about the sandbox itself: the user allowed code execution."""
    monkeypatch.setenv("SRD_ALLOW_CODE_EXECUTION", "1")


def test_answer_match_reference_check():
    check = get_scorer("answer_match").reference_ok
    assert check(_math("42"))
    assert not check(Example(id="x", instruction="q", input="", output="no number here"))


def _code(tests: list[str], reference: str = "def f(x):\n    return x + 1\n", id_: str = "c") -> Example:
    return Example(id=id_, instruction="write f", input="", output=reference, meta={"test_list": tests})


TESTS = ["assert f(1) == 2", "assert f(2) == 3", "assert f(-1) == 0"]


def test_tests_pass_counts_each_assert():
    score = get_scorer("tests_pass").fn
    assert score(_code(TESTS), "```python\ndef f(x):\n    return x + 1\n```", {}) == 100.0
    # right for positive x only: 2 of 3 asserts pass
    partial = "def f(x):\n    return abs(x) + 1\n"
    assert score(_code(TESTS), partial, {}) == pytest.approx(200 / 3)
    assert score(_code(TESTS), "def f(x) return", {}) == 0.0  # syntax error
    assert score(_code(TESTS), "import os\nos._exit(3)\n", {}) == 0.0  # crashes the interpreter
    assert math.isnan(score(_code([]), "def f(x): return 1", {}))  # nothing to check


def test_tests_pass_survives_a_hanging_answer(monkeypatch):
    monkeypatch.setattr(scorers_mod, "TESTS_TIMEOUT_S", 2.0)
    assert get_scorer("tests_pass").fn(_code(TESTS), "while True:\n    pass\n", {}) == 0.0


def test_tests_pass_reference_check():
    check = get_scorer("tests_pass").reference_ok
    assert check(_code(TESTS))
    assert not check(_code(TESTS, reference="def f(x):\n    return x\n"))
    assert not check(_code([]))


def test_fusion_of_three_scorers_drops_invalid_references():
    """rouge_l + ce + answer_match fuse as sum of three RRF terms; a row whose reference has no
    answer is reported and never kept; lambda applies to the valid rows."""
    refs = ["10", "20", "30", "40", "50", "60", "70"]
    examples = [_math(r, id_=f"m{i}") for i, r in enumerate(refs)]
    examples.append(Example(id="bad", instruction="q", input="", output="I cannot tell."))
    outputs = ["10", "wrong", "30", "wrong", "50", "wrong", "70", "I cannot tell."]
    rows = {
        ex.id: {"student_output": f"Some steps.\n#### {o}" if o[0].isdigit() else o, "stats": {"ce": 1.0 + i / 10}}
        for i, (ex, o) in enumerate(zip(examples, outputs))
    }
    names = ["rouge_l", "ce", "answer_match"]
    manifest = build_manifest(
        examples, rows, names, rrf_k=60.0, keep_ratio=0.75, n_stages=3, order="easy_to_hard", seed=0
    )
    by_id = {r["id"]: r for r in manifest}
    for r in manifest:
        assert r["fused"] == pytest.approx(sum(1 / (60 + r["ranks"][s]) for s in names))
    assert by_id["bad"]["reference_ok"] is False and not by_id["bad"]["kept"]
    assert by_id["bad"]["position"] == 8  # after every valid row
    assert sum(r["kept"] for r in manifest) == 5  # floor(0.75 * 7 valid rows)
    # the student's right answers (m0, m2, m4, m6) outrank its wrong ones on answer_match
    assert all(by_id[f"m{i}"]["scores"]["answer_match"] == 100.0 for i in (0, 2, 4, 6))
    assert by_id["m1"]["ranks"]["answer_match"] > by_id["m6"]["ranks"]["answer_match"]
    summary = summarize(manifest, names)
    assert summary["invalid_references"] == {"count": 1, "ids": ["bad"]}
    # with the switch off the row competes like any other
    kept_all = build_manifest(
        examples,
        rows,
        names,
        rrf_k=60.0,
        keep_ratio=1.0,
        n_stages=3,
        order="easy_to_hard",
        seed=0,
        drop_invalid_references=False,
    )
    assert all(r["kept"] for r in kept_all)
