"""What an average hides: answer lengths and the score by reference length and topic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srd.data.example import Example
from srd.eval.breakdown import (
    answer_words,
    breakdown,
    bucket_label,
    example_scores,
    groups,
    length_summary,
    loops,
)
from srd.eval.evaluate import EvalError
from srd.report import breakdown_table, length_table


def _eval(folder: Path, bench: str, rows: dict[str, list[tuple[str, float]]]) -> Path:
    """An eval folder with one file per decoding seed: rows = id -> [(prediction, score) per seed]."""
    (folder / bench).mkdir(parents=True)
    n_seeds = len(next(iter(rows.values())))
    for s in range(n_seeds):
        lines = [json.dumps({"id": i, "prediction": r[s][0], "score": r[s][1]}) for i, r in rows.items()]
        (folder / bench / f"seed-{s}.jsonl").write_text("\n".join(lines) + "\n")
    return folder


EXAMPLES = [
    Example(id="a", instruction="q", output="one two three", meta={"topic": "open_qa"}),  # 3 words
    Example(id="b", instruction="q", output=" ".join(["w"] * 20), meta={"topic": "open_qa"}),  # 20
    Example(id="c", instruction="q", output=" ".join(["w"] * 50), meta={"topic": "brainstorming"}),  # 50
    Example(id="d", instruction="q", output=" ".join(["w"] * 100)),  # 100, no topic
]


def test_buckets_and_groups():
    assert [bucket_label(n) for n in (0, 10, 11, 30, 31, 80, 81, 500)] == [
        "reference 0-10 words",
        "reference 0-10 words",
        "reference 11-30 words",
        "reference 11-30 words",
        "reference 31-80 words",
        "reference 31-80 words",
        "reference > 80 words",
        "reference > 80 words",
    ]
    g = groups(EXAMPLES)
    assert list(g) == [
        "all",
        "reference 0-10 words",
        "reference 11-30 words",
        "reference 31-80 words",
        "reference > 80 words",
        "topic brainstorming",
        "topic open_qa",
    ]
    assert g["all"] == ["a", "b", "c", "d"] and g["topic open_qa"] == ["a", "b"] and g["reference > 80 words"] == ["d"]
    many = [Example(id=f"t{i}", instruction="q", output="w", meta={"topic": f"app {i}"}) for i in range(13)]
    assert not [k for k in groups(many) if k.startswith("topic")]  # too many topics to say anything


def test_lengths_and_scores_average_over_decoding_and_training_seeds(tmp_path):
    one = _eval(tmp_path / "s1", "b", {"a": [("x y", 10.0), ("x y z w", 30.0)], "b": [("x", 0.0), ("x", 0.0)]})
    two = _eval(tmp_path / "s2", "b", {"a": [("x", 50.0), ("x", 50.0)], "c": [("x", 5.0), ("x", 5.0)]})
    assert answer_words(one, "b") == {"a": 3.0, "b": 1.0}
    assert example_scores(one, "b") == {"a": 20.0, "b": 0.0}
    # over two training seeds: only the ids both scored, each the mean of the two seeds' means
    assert example_scores([one, two], "b") == {"a": 35.0}
    assert answer_words([one, two], "b")["a"] == pytest.approx((2 + 4 + 1 + 1) / 4)
    s = length_summary(one, "b", EXAMPLES)
    assert s["n"] == 2 and s["answer_words"] == 2.0 and s["reference_words"] == 11.5
    assert s["ratio"] == pytest.approx(2 / 11.5) and s["shorter_share"] == 0.5  # a: 3 words of 3


def test_breakdown_pairs_each_group_and_the_tables_show_it(tmp_path):
    short = {i: [(" ".join(["w"] * 5), 20.0)] for i in "abcd"}
    long = {i: [(" ".join(["w"] * 40), 20.0 + (10.0 if i in "cd" else -10.0))] for i in "abcd"}
    kd, srd = _eval(tmp_path / "kd", "b", short), _eval(tmp_path / "srd", "b", long)
    rows = {r["group"]: r for r in breakdown(kd, srd, "b", EXAMPLES)}
    assert rows["all"]["n"] == 4 and rows["all"]["score"] == (20.0, 20.0) and rows["all"]["words"] == (5.0, 40.0)
    assert rows["reference > 80 words"]["score"] == (20.0, 30.0)
    assert rows["topic open_qa"]["pairs"] == ({"a": 20.0, "b": 20.0}, {"a": 10.0, "b": 10.0})
    table = breakdown_table(("KD", kd), [("SRD", srd)], "b", EXAMPLES)
    assert table[0].startswith("| group | n | reference words | KD: score (words) | SRD: minus KD (words) |")
    line = next(x for x in table if x.startswith("| topic open_qa |"))
    assert "| 2 | 12 | 20.00 (5) | -10.00 [-10.00, -10.00]" in line and line.endswith("(40) |")
    lengths = length_table([("KD", kd), ("SRD", [srd])], {"b": EXAMPLES})
    assert lengths[2] == "| KD | 5.0 / 43.2 (0.12, 75%; 5, 0%) |"
    assert lengths[3] == "| SRD | 40.0 / 43.2 (0.92, 50%; 40, 100%) |"  # 40 x "w": one distinct 4-gram


def test_looping_answers_and_the_median_length(tmp_path):
    loop = "1. The fish are a type of animal. " + " ".join(f"{i}. The fish are a type of animal." for i in range(2, 9))
    prose = "Camels store fat in their humps and can drink a great deal of water at once when they find it."
    assert loops(loop) and not loops(prose)
    assert not loops("a a a a a a a a a a a")  # 11 words: too short to call a loop
    assert loops(" ".join(["a"] * 12))
    # one seed loops on row d (64 words), the other answers it in one: d's words are their mean, 32.5
    folder = _eval(
        tmp_path / "m",
        "b",
        {
            "a": [("x", 0.0), ("x", 0.0)],
            "b": [("x y", 0.0), ("x y", 0.0)],
            "c": [(prose, 0.0), (prose, 0.0)],
            "d": [(loop, 0.0), ("x", 0.0)],
        },
    )
    s = length_summary(folder, "b", EXAMPLES)
    assert s["loop_share"] == pytest.approx(1 / 8)  # one answer of eight
    assert s["median_answer_words"] == pytest.approx((2 + 20) / 2)  # rows: 1, 2, 20, 32.5 words
    assert s["answer_words"] == pytest.approx((1 + 2 + 20 + 32.5) / 4)  # the loop pulls the mean up


def test_only_the_answer_files_the_evaluation_wrote_are_read(tmp_path):
    folder = _eval(tmp_path / "e", "b", {"a": [("x y", 10.0), ("x", 30.0)]})
    # a copy and another tool's file beside the answers: never read as this model's answers
    (folder / "b" / "seed-0 (copy).jsonl").write_text(json.dumps({"id": "a", "prediction": "z", "score": 99.0}) + "\n")
    (folder / "b" / "other.jsonl").write_text(json.dumps({"id": "a", "prediction": "z", "score": 99.0}) + "\n")
    assert example_scores(folder, "b") == {"a": 20.0}
    assert answer_words(folder, "b") == {"a": 1.5}
    # with a summary, only the decodings it lists: seed-1 is not finished there
    summary = {"benchmarks": {"b": {"per_seed": {"seed-0": 10.0}}}}
    (folder / "summary.json").write_text(json.dumps(summary))
    assert example_scores(folder, "b") == {"a": 10.0}
    assert example_scores(folder, "other-bench") == {}
    (folder / "b" / "seed-0.jsonl").unlink()
    with pytest.raises(EvalError, match=r"seed-0\.jsonl is missing.*rerun `srd eval`"):
        example_scores(folder, "b")
