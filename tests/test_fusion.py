"""Rank fusion, selection, partition and schedules: pure functions, exact values."""

from __future__ import annotations

import numpy as np
import pytest

from srd.config import CurriculumConfig
from srd.curriculum import linear, plan_stages, sample_passes, stage_alphas, stage_taus
from srd.reflect import (
    SCORERS,
    n_kept,
    ordinal_ranks,
    partition_sizes,
    ranks,
    reciprocal_rank_fusion,
    register_scorer,
    select_and_partition,
)


def test_ordinal_ranks_directions_and_ties():
    ids = ["a", "b", "c", "d"]
    assert ordinal_ranks([0.9, 0.1, 0.5, 0.5], ids, higher_is_easier=True).tolist() == [1, 4, 2, 3]
    assert ordinal_ranks([0.9, 0.1, 0.5, 0.5], ids, higher_is_easier=False).tolist() == [4, 1, 2, 3]
    # ties are broken by id, whatever the input order
    assert ordinal_ranks([1.0, 1.0, 1.0], ["z", "x", "y"], higher_is_easier=True).tolist() == [3, 1, 2]
    # NaN ranks last
    assert ordinal_ranks([float("nan"), 2.0, 1.0], ["a", "b", "c"], higher_is_easier=True).tolist() == [3, 1, 2]


def test_average_ranks_share_a_rank_within_ties():
    ids = ["a", "b", "c", "d", "e"]
    # pass/fail: the two passes share ranks 1-2, the three fails ranks 3-5
    assert ranks([100, 0, 0, 100, 0], ids, higher_is_easier=True, ties="average").tolist() == [1.5, 4, 4, 1.5, 4]
    assert ranks([float("nan"), 1, 1, 2, float("nan")], ids, higher_is_easier=False, ties="average").tolist() == [
        4.5,
        1.5,
        1.5,
        3,
        4.5,
    ]
    assert ranks([3, 1, 2], ["a", "b", "c"], higher_is_easier=True).tolist() == [1, 3, 2]  # ordinal by default
    with pytest.raises(ValueError, match="ties"):
        ranks([1], ["a"], higher_is_easier=True, ties="dense")


def test_a_pass_fail_scorer_only_moves_what_it_can_tell_apart():
    """Three scorers fused: answer_match (mostly 0) lifts its one correct example and leaves the
    order of the others to ROUGE-L and CE, instead of ranking its ties by id."""
    ids = [f"gsm8k-{i}" for i in (1, 2, 10, 11, 3)]
    rouge = [10.0, 30.0, 20.0, 40.0, 0.0]
    ce = [2.0, 1.5, 1.8, 1.0, 3.0]
    answer = [0.0, 0.0, 0.0, 0.0, 100.0]
    two = reciprocal_rank_fusion([ranks(rouge, ids, higher_is_easier=True), ranks(ce, ids, higher_is_easier=False)])
    a = ranks(answer, ids, higher_is_easier=True, ties=SCORERS["answer_match"].ties)
    three = reciprocal_rank_fusion(
        [ranks(rouge, ids, higher_is_easier=True), ranks(ce, ids, higher_is_easier=False), a]
    )
    others = [0, 1, 2, 3]
    assert np.argsort(-three[others]).tolist() == np.argsort(-two[others]).tolist()
    assert three[4] - two[4] > three[0] - two[0]  # the correct answer gained the most
    assert SCORERS["tests_pass"].ties == "average" and SCORERS["rouge_l"].ties == "ordinal"


def test_rrf_exact_values():
    r1, r2 = np.array([1, 2, 3]), np.array([3, 1, 2])
    f = reciprocal_rank_fusion([r1, r2], k=60)
    assert f.tolist() == pytest.approx([1 / 61 + 1 / 63, 1 / 62 + 1 / 61, 1 / 63 + 1 / 62])
    # a single ranking keeps its order
    assert np.argsort(-reciprocal_rank_fusion([r1])).tolist() == [0, 1, 2]
    with pytest.raises(ValueError):
        reciprocal_rank_fusion([])
    with pytest.raises(ValueError, match=r"rankings of the same examples, got rankings of \[3, 2\] examples"):
        reciprocal_rank_fusion([r1, r2[:2]])


def test_n_kept_and_partition():
    assert n_kept(12, 0.75) == 9 and n_kept(10, 0.75) == 7 and n_kept(1, 0.75) == 1 and n_kept(0, 0.75) == 0
    assert n_kept(100, 1.0) == 100
    assert partition_sizes(9, 3) == [3, 3, 3]
    assert partition_sizes(7, 3) == [3, 2, 2]
    assert partition_sizes(2, 3) == [1, 1, 0]


def test_select_and_partition_easy_to_hard():
    ids = [f"e{i}" for i in range(8)]
    fused = [0.1, 0.8, 0.5, 0.3, 0.9, 0.2, 0.7, 0.6]  # easiest: e4, e1, e6, e7, e2, e3, e5, e0
    ranking, stage = select_and_partition(fused, ids, keep_ratio=0.75, n_stages=3)
    assert ranking == [4, 1, 6, 7, 2, 3, 5, 0]
    # keep floor(0.75 * 8) = 6 -> stages of 2, 2, 2 in easy -> hard order
    assert stage == [None, 1, 3, 3, 1, None, 2, 2]


def test_select_orders_and_lambda_one():
    ids = [f"e{i}" for i in range(6)]
    fused = [6, 5, 4, 3, 2, 1]
    _, stage = select_and_partition(fused, ids, keep_ratio=1.0, n_stages=3)
    assert stage == [1, 1, 2, 2, 3, 3]
    _, stage = select_and_partition(fused, ids, keep_ratio=1.0, n_stages=3, order="hard_to_easy")
    assert stage == [3, 3, 2, 2, 1, 1]
    _, s1 = select_and_partition(fused, ids, keep_ratio=0.5, n_stages=3, order="random", seed=1)
    _, s2 = select_and_partition(fused, ids, keep_ratio=0.5, n_stages=3, order="random", seed=1)
    assert s1 == s2 and sorted(x for x in s1 if x) == [1, 2, 3] and s1[3:] == [None] * 3


def test_ties_in_fused_scores_are_deterministic():
    ids = ["b", "a", "c"]
    ranking, _ = select_and_partition([1.0, 1.0, 1.0], ids, keep_ratio=1.0, n_stages=1)
    assert ranking == [1, 0, 2]


def test_fewer_examples_than_stages():
    _, stage = select_and_partition([0.5, 0.4], ["a", "b"], keep_ratio=1.0, n_stages=3)
    assert stage == [1, 2]
    manifest = [{"id": "a", "stage": 1, "position": 1}, {"id": "b", "stage": 2, "position": 2}]
    stages = plan_stages(manifest, CurriculumConfig(num_stages=3))
    assert [s.example_ids for s in stages] == [("a",), ("a", "b"), ("a", "b")]


def test_schedules():
    assert linear(1.0, 2.0, 3) == [1.0, 1.5, 2.0]
    assert linear(0.3, 0.1, 3) == pytest.approx([0.3, 0.2, 0.1])
    assert linear(1.0, 2.0, 1) == [1.0]
    assert stage_taus(CurriculumConfig()) == [1.0, 1.5, 2.0]
    assert stage_alphas(CurriculumConfig()) == pytest.approx([0.3, 0.2, 0.1])
    assert stage_taus(CurriculumConfig(tau_schedule="falling")) == [2.0, 1.5, 1.0]
    assert stage_taus(CurriculumConfig(tau_schedule="fixed")) == [1.0, 1.0, 1.0]
    assert stage_alphas(CurriculumConfig(alpha_schedule="rising")) == pytest.approx([0.1, 0.2, 0.3])
    assert stage_alphas(CurriculumConfig(alpha_schedule="fixed")) == pytest.approx([0.3] * 3)
    assert stage_taus(CurriculumConfig(num_stages=5)) == [1.0, 1.25, 1.5, 1.75, 2.0]


def test_plan_stages_is_cumulative_in_position_order():
    manifest = [
        {"id": f"x{i}", "stage": s, "position": p}
        for i, (s, p) in enumerate([(2, 3), (1, 2), (None, 5), (3, 4), (1, 1)])
    ]
    stages = plan_stages(manifest, CurriculumConfig())
    assert [s.example_ids for s in stages] == [("x4", "x1"), ("x4", "x1", "x0"), ("x4", "x1", "x0", "x3")]
    assert [s.tau for s in stages] == [1.0, 1.5, 2.0]


def test_srd_step_budget_is_60_percent_of_the_baseline():
    n = 1200
    sizes = [300, 600, 900]  # cumulative quarters, lambda = 0.75
    assert sample_passes(sizes, 8) / (20 * n) == pytest.approx(0.6)


def test_custom_scorer_plugs_in_by_name():
    register_scorer("_test_len", lambda ex, out, st: len(out), higher_is_easier=False, needs_generation=True)
    try:
        from srd.config import load_config

        cfg = load_config(None, ["reflect.scorers=[rouge_l, ce, _test_len]"])
        assert cfg.reflect.scorers == ["rouge_l", "ce", "_test_len"]
    finally:
        SCORERS.pop("_test_len")


def test_length_strata_and_the_stratified_cut():
    from srd.reflect.fusion import length_strata, n_kept_stratified

    ids = [f"e{i}" for i in range(8)]
    lengths = [5, 100, 7, 90, 6, 95, 8, 80]  # four short rows, four long ones
    assert length_strata(lengths, ids, 2) == [0, 1, 0, 1, 0, 1, 0, 1]
    # every short row is easier than every long one: a global cut at lambda 0.5 keeps only short rows
    fused = [1.0, 0.1, 0.9, 0.2, 0.8, 0.3, 0.7, 0.4]
    _, stage = select_and_partition(fused, ids, keep_ratio=0.5, n_stages=2)
    assert [i for i, s in enumerate(stage) if s is not None] == [0, 2, 4, 6]
    # stratified: the easiest half of each stratum, then staged easy -> hard over all kept rows
    ranking, stage = select_and_partition(fused, ids, keep_ratio=0.5, n_stages=2, strata=length_strata(lengths, ids, 2))
    assert ranking == [0, 2, 4, 6, 7, 5, 3, 1]
    assert {i: s for i, s in enumerate(stage) if s is not None} == {0: 1, 2: 1, 7: 2, 5: 2}
    assert n_kept_stratified(8, 0.5, 2) == 4 and n_kept_stratified(200, 0.75, 4) == 148
    with pytest.raises(ValueError, match="strata labels"):
        select_and_partition(fused, ids, keep_ratio=0.5, n_stages=2, strata=[0, 1])
    # stratified stages: each stratum's kept rows staged on their own, so each stage has one short
    # row and one long one (the same kept rows as the stratified cut)
    _, staged = select_and_partition(
        fused, ids, keep_ratio=0.5, n_stages=2, strata=length_strata(lengths, ids, 2), stratify_stages=True
    )
    assert {i: s for i, s in enumerate(staged) if s is not None} == {0: 1, 2: 2, 7: 1, 5: 2}
    # in any order: reversed, the harder row of each stratum comes first
    _, back = select_and_partition(
        fused,
        ids,
        keep_ratio=0.5,
        n_stages=2,
        order="hard_to_easy",
        strata=length_strata(lengths, ids, 2),
        stratify_stages=True,
    )
    assert {i: s for i, s in enumerate(back) if s is not None} == {0: 2, 2: 1, 7: 2, 5: 1}
    with pytest.raises(ValueError, match="stratify_stages needs strata"):
        select_and_partition(fused, ids, keep_ratio=0.5, n_stages=2, stratify_stages=True)
