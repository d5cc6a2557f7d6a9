"""Rank fusion, selection and stage partition: pure functions on arrays.

SRD paper Sec. 3.2: rank examples by each difficulty signal, fuse the ranks with
reciprocal rank fusion f_i = sum_s 1 / (k + rank_s(i)) (k = 60; higher f = easier),
keep the easiest lambda fraction, and split it into n consecutive stages, easy -> hard.

Beyond the paper, the cut can keep each stratum's share (`strata`: one label per example, e.g.
`length_strata` of the reference lengths): the easiest lambda of every stratum is kept instead
of the easiest lambda overall, so that a kind of row that is hard for any model (long open-ended
references) is not dropped as a block; the kept rows are then ordered and staged as before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def ordinal_ranks(scores: Sequence[float], ids: Sequence[str], *, higher_is_easier: bool) -> np.ndarray:
    """Ranks 1..N, 1 = easiest. Ties are broken by id (ascending), so the result is
    deterministic; NaN scores rank as the hardest."""
    key = _easy_first_key(scores, ids, higher_is_easier)
    order = sorted(range(len(key)), key=lambda i: (key[i], str(ids[i])))
    ranks = np.empty(len(key), dtype=np.int64)
    ranks[order] = np.arange(1, len(key) + 1)
    return ranks


def _easy_first_key(scores: Sequence[float], ids: Sequence[str], higher_is_easier: bool) -> np.ndarray:
    """Sort key, smaller = easier; NaN scores become the hardest (+inf)."""
    values = np.asarray(scores, dtype=np.float64)
    if len(values) != len(ids):
        raise ValueError(f"{len(values)} scores for {len(ids)} ids")
    key = -values if higher_is_easier else values
    return np.where(np.isnan(key), np.inf, key)


def ranks(scores: Sequence[float], ids: Sequence[str], *, higher_is_easier: bool, ties: str = "ordinal") -> np.ndarray:
    """Ranks, 1 = easiest: `ordinal_ranks`, or with ties="average" the mean rank of each group
    of equal scores (1, 2.5, 2.5, 4 ...; NaN scores tie as the hardest group)."""
    if ties == "ordinal":
        return ordinal_ranks(scores, ids, higher_is_easier=higher_is_easier)
    if ties != "average":
        raise ValueError(f"ties must be 'ordinal' or 'average', got {ties!r}")
    from scipy.stats import rankdata

    return rankdata(_easy_first_key(scores, ids, higher_is_easier), method="average")


def reciprocal_rank_fusion(rank_lists: Sequence[np.ndarray], k: float = 60.0) -> np.ndarray:
    """f_i = sum over rankings of 1 / (k + rank_i); higher = easier."""
    if not rank_lists:
        raise ValueError("fusion needs at least one ranking")
    sizes = [len(r) for r in rank_lists]
    if len(set(sizes)) > 1:
        raise ValueError(f"fusion needs rankings of the same examples, got rankings of {sizes} examples")
    return np.sum([1.0 / (k + np.asarray(r, dtype=np.float64)) for r in rank_lists], axis=0)


def easy_to_hard(fused: Sequence[float], ids: Sequence[str]) -> list[int]:
    """Indices sorted by fused score, highest (easiest) first; ties by id."""
    return sorted(range(len(fused)), key=lambda i: (-float(fused[i]), str(ids[i])))


def n_kept(n: int, keep_ratio: float) -> int:
    """floor(lambda * N), at least 1 when N > 0 (a tiny data set still trains)."""
    if n == 0:
        return 0
    return max(1, math.floor(keep_ratio * n + 1e-9))


def partition_sizes(n: int, n_stages: int) -> list[int]:
    """Near-equal consecutive slice sizes; the first slices take the remainder."""
    base, extra = divmod(n, n_stages)
    return [base + (1 if i < extra else 0) for i in range(n_stages)]


def length_strata(lengths: Sequence[float], ids: Sequence[str], n_strata: int) -> list[int]:
    """Stratum 0..n_strata-1 of each example by its length: equal-count groups from shortest to
    longest (ties by id), sizes as `partition_sizes`."""
    order = sorted(range(len(lengths)), key=lambda i: (float(lengths[i]), str(ids[i])))
    label = [0] * len(order)
    start = 0
    for s, size in enumerate(partition_sizes(len(order), n_strata)):
        for i in order[start : start + size]:
            label[i] = s
        start += size
    return label


def n_kept_stratified(n: int, keep_ratio: float, n_strata: int) -> int:
    """How many `select_and_partition` keeps of n examples in `length_strata`'s n_strata groups."""
    return sum(n_kept(size, keep_ratio) for size in partition_sizes(n, n_strata))


def select_and_partition(
    fused: Sequence[float],
    ids: Sequence[str],
    *,
    keep_ratio: float,
    n_stages: int,
    order: str = "easy_to_hard",
    seed: int = 0,
    strata: Sequence[int] | None = None,
    stratify_stages: bool = False,
) -> tuple[list[int], list[int | None]]:
    """Choose the kept examples and the stage of each.

    Returns (ranking, stage): `ranking` is every index easy -> hard by fused score;
    `stage[i]` is the 1-based stage of index i, or None if it was filtered out. The
    easiest floor(lambda N) are kept whatever the order (with `strata`, the easiest
    floor(lambda N_s) of every stratum s); `order` decides which kept examples come first in
    the curriculum (easy_to_hard, hard_to_easy, or random). `stratify_stages` (with `strata`):
    each stratum's kept examples are split into the stages on their own, in that order, so
    every stage holds each stratum's share (stage 1: the easiest third of every stratum)
    instead of the easiest third overall.
    """
    ranking = easy_to_hard(fused, ids)
    if strata is None:
        kept = ranking[: n_kept(len(ranking), keep_ratio)]
    else:
        if len(strata) != len(ranking):
            raise ValueError(f"{len(strata)} strata labels for {len(ranking)} examples")
        members: dict[int, list[int]] = {}
        for i in ranking:  # easy -> hard within each stratum
            members.setdefault(int(strata[i]), []).append(i)
        chosen = {i for group in members.values() for i in group[: n_kept(len(group), keep_ratio)]}
        kept = [i for i in ranking if i in chosen]
    if order == "hard_to_easy":
        kept = kept[::-1]
    elif order == "random":
        kept = [kept[i] for i in np.random.default_rng(seed).permutation(len(kept))]
    elif order != "easy_to_hard":
        raise ValueError(f"unknown curriculum order {order!r}")
    if stratify_stages and strata is None:
        raise ValueError("stratify_stages needs strata")
    stage: list[int | None] = [None] * len(ranking)
    slices = [kept]
    if stratify_stages:  # each stratum's kept rows in curriculum order, split on their own
        by_stratum: dict[int, list[int]] = {}
        for i in kept:
            by_stratum.setdefault(int(strata[i]), []).append(i)
        slices = [by_stratum[k] for k in sorted(by_stratum)]
    for rows in slices:
        start = 0
        for s, size in enumerate(partition_sizes(len(rows), n_stages), start=1):
            for i in rows[start : start + size]:
                stage[i] = s
            start += size
    return ranking, stage
