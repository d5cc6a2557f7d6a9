"""Chunked KD + CE loss over response tokens.

Full-vocabulary float32 tensors are the memory hog of white-box KD (B x T x V, with
V = 49k-152k). Here only the valid response positions are kept (N x H hidden states),
and the language-model heads, log-softmaxes and divergence run over chunks of
`chunk_size` tokens inside activation checkpoints: forward and backward hold the
logits of one chunk at a time.

The functions return *sums* over tokens. The caller divides by the number of valid
tokens in the whole optimizer step, which keeps gradient accumulation exact
(SRD-NOTES sec. 1: "mean over all valid tokens of the optimizer step").
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from srd.losses.divergences import get_divergence

Head = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class SparseTeacher:
    """A cached teacher: per target position its top-k token ids and k + 1 bucket logits (the
    top-k logits and one logit standing for all other tokens; see srd.train.teacher_cache)."""

    ids: Tensor  # (N, k) int64
    buckets: Tensor  # (N, k + 1) float32

    def __getitem__(self, sl: slice) -> SparseTeacher:
        return SparseTeacher(self.ids[sl], self.buckets[sl])


def sparse_student_buckets(logits: Tensor, ids: Tensor, tau: float) -> Tensor:
    """The student's distribution at temperature tau over the teacher's top-k tokens and one
    bucket for the rest, as logits whose log-softmax at tau is exactly those log-probs."""
    return log_prob_buckets(torch.log_softmax(logits.float() / tau, dim=-1), ids, tau)


def log_prob_buckets(logq: Tensor, ids: Tensor, tau: float) -> Tensor:
    """sparse_student_buckets from the student's log-probabilities at tau."""
    top = logq.gather(-1, ids)
    rest = logq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(-80.0)
    return torch.cat([top, rest], dim=-1) * tau


@dataclass
class LossSums:
    """Sums over the valid tokens of one micro-batch (0-dim tensors) and their count."""

    ce: Tensor
    kd: Tensor
    n_tokens: int


def kd_loss_sums(
    student_in: Tensor,
    teacher_in: Tensor | None,
    targets: Tensor,
    *,
    divergence: str = "fkl",
    tau: float = 1.0,
    beta: float | None = None,
    chunk_size: int = 1024,
    student_head: Head = _identity,
    teacher_head: Head = _identity,
    recompute: bool = True,
    recompute_log_probs: bool = False,
) -> LossSums:
    """Cross-entropy and divergence summed over N valid tokens, in chunks.

    Args:
        student_in: (N, H) student hidden states (or (N, V) logits with the identity head).
        teacher_in: (N, H_t) teacher hidden states / logits, a SparseTeacher (cached top-k:
            the divergence is taken over its k tokens + one bucket for the rest), or None for CE only.
        targets: (N,) next-token ids (already filtered to valid positions).
        student_head / teacher_head: map a chunk of hidden states to (n, V) logits.
        recompute: run each chunk inside an activation checkpoint (its logits are recomputed
            in backward: least memory); False keeps every chunk's activations (faster when
            the logits fit, e.g. on a compute-bound CPU).
        recompute_log_probs: with 16-bit heads (bf16 autocast) and a divergence with a joint CE
            (forward KL), keep the heads' logits and one value per row for backward and rebuild
            the float32 log-probabilities there: half the bytes of the float32 p and log q kept
            otherwise, the same values, gradients equal to float32 rounding, a few more
            vocabulary-sized passes.
    Returns:
        LossSums with ce = sum -log q_1(y) (tau = 1) and kd = sum D(p_tau || q_tau).
    """
    n = targets.shape[0]
    acc_dtype = torch.float64 if student_in.dtype == torch.float64 else torch.float32
    zero = student_in.new_zeros((), dtype=acc_dtype)
    if n == 0:
        # Keep the graph connected so every rank runs the same backward (DDP).
        return LossSums(ce=zero + 0.0 * student_in.sum(), kd=zero.clone(), n_tokens=0)
    div = get_divergence(divergence) if teacher_in is not None else None

    def chunk_sums(s: Tensor, t: Tensor | None, y: Tensor) -> tuple[Tensor, Tensor]:
        raw = student_head(s)
        if div is None or t is None:
            ce = F.cross_entropy(raw.to(acc_dtype), y, reduction="sum")
            return ce, ce.new_zeros(())
        if isinstance(t, SparseTeacher):
            logits = raw.to(acc_dtype)
            if tau == 1.0:  # the CE's log-softmax is the buckets' own
                logq = torch.log_softmax(logits, dim=-1)
                ce = -logq.gather(-1, y.unsqueeze(-1)).sum()
                student_buckets = log_prob_buckets(logq, t.ids, tau)
            else:
                ce = F.cross_entropy(logits, y, reduction="sum")
                student_buckets = sparse_student_buckets(logits, t.ids, tau)
            kd = div.fn(student_buckets, t.buckets, None, tau=tau, beta=beta).sum()
            return ce, kd.to(acc_dtype)
        with torch.no_grad():
            t_logits = teacher_head(t)
        vocab = min(raw.shape[-1], t_logits.shape[-1])  # padded embedding rows are sliced off
        t_logits = t_logits[..., :vocab]
        # bf16 logits in: forward_kl keeps them (and one value per row) for backward; float32 in:
        # it keeps float32 log-probabilities
        lean = recompute_log_probs and torch.is_grad_enabled()
        if not lean:
            t_logits = t_logits.to(acc_dtype)
        if div.with_ce is not None and vocab == raw.shape[-1]:  # one log-softmax for both
            kd, ce = div.with_ce(raw if lean else raw.to(acc_dtype), t_logits, y, tau=tau, beta=beta)
            return ce.sum().to(acc_dtype), kd.sum().to(acc_dtype)
        # one float32 copy of bf16 logits for the CE and the divergence: their gradients are
        # summed in float32 and rounded to bf16 once, instead of two casts each way
        logits = raw.to(acc_dtype)
        ce = F.cross_entropy(logits, y, reduction="sum")
        kd = div.fn(logits[..., :vocab], t_logits, None, tau=tau, beta=beta).sum()
        return ce, kd.to(acc_dtype)

    ce_total, kd_total = zero, zero
    for start in range(0, n, chunk_size):
        sl = slice(start, start + chunk_size)
        t_chunk = teacher_in[sl] if teacher_in is not None else None
        if recompute and torch.is_grad_enabled() and student_in.requires_grad:
            ce, kd = checkpoint(chunk_sums, student_in[sl], t_chunk, targets[sl], use_reentrant=False)
        else:
            ce, kd = chunk_sums(student_in[sl], t_chunk, targets[sl])
        ce_total = ce_total + ce
        kd_total = kd_total + kd
    return LossSums(ce=ce_total, kd=kd_total, n_tokens=n)


def combine(sums: LossSums, *, alpha: float, kd_scale: float, denominator: float) -> Tensor:
    """loss = (alpha * CE_sum + (1 - alpha) * kd_scale * KD_sum) / denominator  (SRD Eq. 6)."""
    return (alpha * sums.ce + (1.0 - alpha) * kd_scale * sums.kd) / max(denominator, 1.0)
