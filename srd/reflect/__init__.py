"""Selective reflection: scorers (registry), rank fusion + selection, manifest building."""

from srd.reflect.fusion import (
    easy_to_hard,
    n_kept,
    ordinal_ranks,
    partition_sizes,
    ranks,
    reciprocal_rank_fusion,
    select_and_partition,
)
from srd.reflect.scorers import SCORERS, Scorer, get_scorer, register_scorer

__all__ = [
    "SCORERS",
    "Scorer",
    "easy_to_hard",
    "get_scorer",
    "n_kept",
    "ordinal_ranks",
    "partition_sizes",
    "ranks",
    "reciprocal_rank_fusion",
    "register_scorer",
    "select_and_partition",
]
