"""KD losses: pure per-token divergences (registry by name) and the chunked KD + CE loss."""

from srd.losses.divergences import (
    DIVERGENCES,
    Divergence,
    forward_kl,
    forward_kl_with_ce,
    get_divergence,
    js_divergence,
    register_divergence,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    tau_scale,
    total_variation,
)
from srd.losses.kd import LossSums, combine, kd_loss_sums

__all__ = [
    "DIVERGENCES",
    "Divergence",
    "LossSums",
    "combine",
    "forward_kl",
    "forward_kl_with_ce",
    "get_divergence",
    "js_divergence",
    "kd_loss_sums",
    "register_divergence",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tau_scale",
    "total_variation",
]
