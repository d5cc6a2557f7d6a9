"""Chunked KD + CE loss over response tokens.

Full-vocabulary float32 tensors are the memory hog of white-box KD (B x T x V, with
V = 49k-152k). Here only the valid response positions are kept (N x H hidden states),
and the language-model heads, log-softmaxes and divergence run over chunks of
`chunk_size` tokens inside activation checkpoints: forward and backward hold the
logits of one chunk at a time.

The functions return *sums* over tokens. The caller divides by the number of valid
tokens in the whole optimizer step, which keeps gradient accumulation exact
(docs/method.md, section 1: the mean over all valid tokens of the optimizer step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from srd.losses.divergences import _ce_and_shift, _log_probs, _lse, _q1, _rebuilt, get_divergence

Head = Callable[[Tensor], Tensor]


def _identity(x: Tensor) -> Tensor:
    return x


@dataclass
class SparseTeacher:
    """A cached teacher: per target position its top-k token ids and k + 1 bucket logits (the
    top-k logits and one logit standing for all other tokens; see srd.train.teacher_store)."""

    ids: Tensor  # (N, k) int64
    buckets: Tensor  # (N, k + 1) float32

    def __getitem__(self, sl: slice) -> SparseTeacher:
        return SparseTeacher(self.ids[sl], self.buckets[sl])


REST_FLOOR = -80.0  # the rest bucket's log-probability floor (a top-k that holds all mass leaves none)


class _StudentBuckets(torch.autograd.Function):
    """The student's distribution at temperature tau over the teacher's cached top-k ids and one
    bucket for all other tokens, as bucket logits whose log-softmax at tau is exactly those
    log-probabilities (tau log q_tau(id_j), and tau log r for the rest's mass r, floored at
    REST_FLOOR), and its CE -log q_1(y), from one log-softmax.

    The backward is written by hand: d bucket_j / d s = onehot(id_j) - q_tau, d rest / d s =
    q_tau (off the ids) / r - q_tau, and the CE's q_1 - onehot(y), summed into one buffer in
    three vocabulary-sized passes where autograd through gather, scatter, logsumexp and
    log-softmax runs about ten. The rest's part is taken as exp(log q - log r), so that no mass
    underflows, and the ids' entries are set apart (no cancellation against 1 / r there)."""

    @staticmethod
    def forward(ctx: object, logits: Tensor, ids: Tensor, targets: Tensor, tau: float):
        lq = _log_probs(logits, tau)
        rest = lq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
        buckets = torch.cat([lq.gather(-1, ids), rest.clamp_min(REST_FLOOR)], dim=-1) * tau
        y = targets.unsqueeze(-1)
        ce, shift = _ce_and_shift(logits, lq, y, tau)  # as in forward_kl_with_ce
        lse = _lse(logits, lq, tau)  # bf16 logits in: kept as they are (recompute_log_probs)
        ctx.tau, ctx.dtype = tau, logits.dtype
        ctx.save_for_backward(lq if lse is None else logits, lse, ids, rest, y, shift)
        return buckets, ce

    @staticmethod
    def backward(ctx: object, g_buckets: Tensor, g_ce: Tensor):
        kept, lse, ids, rest, y, shift = ctx.saved_tensors
        tau = ctx.tau
        lq = _rebuilt(kept, lse, tau)
        g_buckets = g_buckets.to(lq.dtype)
        g_top, g_rest = g_buckets[:, :-1], g_buckets[:, -1:]
        c = g_ce.unsqueeze(-1).to(lq.dtype)
        live = rest >= REST_FLOOR  # below the floor the rest bucket is a constant
        g_rest = torch.where(live, g_rest, torch.zeros_like(g_rest))
        log_r = torch.where(live, rest, torch.zeros_like(rest))
        base = -(g_top.sum(-1, keepdim=True) + g_rest)  # every bucket's -q_tau term
        if tau == 1.0:
            base = base + c  # the CE's +q_1 g_ce, q_1 = q_tau
        q1 = _q1(lq, shift, tau)
        q_ids = lq.gather(-1, ids).exp_()
        # q base + (q / r) g_rest = exp(log q - log r) (g_rest + r base); the ids' entries are set below
        g = torch.sub(lq, log_r, out=lq if lse is not None else None).exp_().mul_(g_rest + log_r.exp() * base)
        g.scatter_(-1, ids, q_ids * base + g_top)
        if q1 is not None:
            g.addcmul_(q1, c)
        g.scatter_add_(-1, y, -c)  # the CE's -onehot(y) g_ce
        return g.to(ctx.dtype), None, None, None


def student_buckets_with_ce(logits: Tensor, ids: Tensor, targets: Tensor, tau: float) -> tuple[Tensor, Tensor]:
    """(the student's bucket logits over `ids` and the rest at tau, -log softmax(logits)[targets])
    per row, from one log-softmax of the student and with one hand-written backward (the cache
    path of kd_loss_sums; see _StudentBuckets)."""
    return _StudentBuckets.apply(logits, ids, targets, tau)


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
        recompute_log_probs: with 16-bit heads (bf16 autocast), a divergence with a joint CE
            (forward KL) or a cached teacher, keep the heads' logits and one value per row for
            backward and rebuild the float32 log-probabilities there: half the bytes of the
            float32 p and log q kept otherwise, the same values, gradients equal to float32
            rounding, a few more vocabulary-sized passes.
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
        # bf16 logits in: the hand-written losses keep them (and one value per row) for backward;
        # float32 in: they keep float32 log-probabilities
        lean = recompute_log_probs and torch.is_grad_enabled()
        logits = raw if lean else raw.to(acc_dtype)
        if isinstance(t, SparseTeacher):  # the CE's log-softmax is the buckets' own
            buckets, ce = student_buckets_with_ce(logits, t.ids, y, tau)
            kd = div.fn(buckets, t.buckets, None, tau=tau, beta=beta).sum()
            return ce.sum().to(acc_dtype), kd.to(acc_dtype)
        with torch.no_grad():
            t_logits = teacher_head(t)
        vocab = min(raw.shape[-1], t_logits.shape[-1])  # padded embedding rows are sliced off
        t_logits = t_logits[..., :vocab] if lean else t_logits[..., :vocab].to(acc_dtype)
        if div.with_ce is not None and vocab == raw.shape[-1]:  # one log-softmax for both
            kd, ce = div.with_ce(logits, t_logits, y, tau=tau, beta=beta)
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
