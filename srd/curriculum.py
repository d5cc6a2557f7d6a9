"""Curriculum plans: which examples, tau and alpha each stage trains with.

Baby Step (SRD paper Sec. 3.3): stage i trains on the union of the i easiest slices,
starting from the weights stage i - 1 ended with. tau and alpha move linearly:

    tau_i   = tau_0   + (tau_n   - tau_0)   (i - 1) / (n - 1)        (paper: 1 -> 2)
    alpha_i = alpha_0 - (alpha_0 - alpha_n) (i - 1) / (n - 1)        (paper: 0.3 -> 0.1)

With 8 epochs per stage over 1/4, 2/4, 3/4 of the data, SRD makes 8 (0.25 + 0.5 + 0.75) N
= 12 N sample passes: 60% of a 20-epoch baseline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from srd.config import CurriculumConfig


@dataclass(frozen=True)
class Stage:
    index: int  # 1-based
    example_ids: tuple[str, ...]  # cumulative: slices 1..index
    tau: float
    alpha: float
    epochs: float


def linear(start: float, end: float, n: int) -> list[float]:
    """n values from start to end, evenly spaced (n = 1 gives [start])."""
    if n == 1:
        return [float(start)]
    return [start + (end - start) * i / (n - 1) for i in range(n)]


def stage_taus(c: CurriculumConfig) -> list[float]:
    if c.tau_schedule == "fixed":
        return [c.tau_start] * c.num_stages
    if c.tau_schedule == "falling":
        return linear(c.tau_end, c.tau_start, c.num_stages)
    return linear(c.tau_start, c.tau_end, c.num_stages)


def stage_alphas(c: CurriculumConfig) -> list[float]:
    if c.alpha_schedule == "fixed":
        return [c.alpha_start] * c.num_stages
    if c.alpha_schedule == "rising":
        return linear(c.alpha_end, c.alpha_start, c.num_stages)
    return linear(c.alpha_start, c.alpha_end, c.num_stages)


def plan_stages(manifest: Sequence[dict[str, Any]], c: CurriculumConfig) -> list[Stage]:
    """Cumulative stages from a manifest's `stage` column, in curriculum order.

    Within a slice the examples keep their curriculum position (`position`), so the plan
    is deterministic; the training loop shuffles within a stage anyway.
    """
    taus, alphas = stage_taus(c), stage_alphas(c)
    by_stage: dict[int, list[dict[str, Any]]] = {i: [] for i in range(1, c.num_stages + 1)}
    for row in manifest:
        if row.get("stage") is not None:
            by_stage[int(row["stage"])].append(row)
    stages, cumulative = [], []
    for i in range(1, c.num_stages + 1):
        cumulative.extend(r["id"] for r in sorted(by_stage[i], key=lambda r: r["position"]))
        stages.append(Stage(i, tuple(cumulative), taus[i - 1], alphas[i - 1], c.epochs_per_stage))
    if not stages[0].example_ids:
        raise ValueError("the first curriculum stage is empty: keep more data (reflect.keep_ratio) or use fewer stages")
    return stages


def plan_full_stages(example_ids: Sequence[str], c: CurriculumConfig) -> list[Stage]:
    """The temperature control (method=scheduled_kd): `c.num_stages` stages that each train on
    every example, with the same tau and alpha schedules and epochs per stage as SRD's plan."""
    if not example_ids:
        raise ValueError("scheduled_kd needs at least one training example")
    taus, alphas = stage_taus(c), stage_alphas(c)
    ids = tuple(example_ids)
    return [Stage(i + 1, ids, taus[i], alphas[i], c.epochs_per_stage) for i in range(c.num_stages)]


def sample_passes(stage_sizes: Sequence[int], epochs_per_stage: float) -> float:
    """Examples seen over the whole curriculum (for the step-budget comparison with a baseline)."""
    return epochs_per_stage * sum(stage_sizes)
