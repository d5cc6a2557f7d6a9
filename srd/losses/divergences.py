"""Token-level divergences between the teacher distribution p and the student q.

Every function has the signature

    fn(student_logits, teacher_logits, mask=None, *, tau=1.0, beta=None) -> per-token loss

with logits of shape (..., V) and mask of shape (...) (True/1 = a response token that
counts). p = softmax(teacher_logits / tau) and q = softmax(student_logits / tau) are
computed in float32 (float64 inputs stay float64). The result has shape (...) and is
exactly 0 wherever the mask is 0, so a fully masked batch never gives NaN.

Definitions (docs/method.md, section 1; SRD paper Eq. 7-9; DistiLLM for the skew variants):

    fkl   KL(p || q) = sum_v p (log p - log q)               forward KL, "KLD"
    rkl   KL(q || p)                                          reverse KL
    jsd   beta KL(p || m) + (1 - beta) KL(q || m),  m = beta p + (1 - beta) q
    tvd   0.5 sum_v |p - q|
    skl   KL(p || beta p + (1 - beta) q)                      skew forward KL
    srkl  KL(q || (1 - beta) p + beta q)                      skew reverse KL

The true KL (with the teacher-entropy term) is returned: the reference code drops that
term for fkl, which leaves the gradient unchanged but logs a wrong value.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


def _log_probs(logits: Tensor, tau: float) -> Tensor:
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    logits = logits.to(dtype)
    return F.log_softmax(logits if tau == 1.0 else logits / tau, dim=-1)


def _kl(log_a: Tensor, log_b: Tensor) -> Tensor:
    """KL(a || b) over the last dim from log-probabilities; terms with a = 0 contribute 0."""
    a = log_a.exp()
    # where a == 0 the term is 0 even if log_a is -inf (e.g. a masked vocabulary entry)
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(-1)


def _mix_log(log_a: Tensor, log_b: Tensor, w_a: float) -> Tensor:
    """log(w_a * a + (1 - w_a) * b), computed stably in log space."""
    return torch.logaddexp(log_a + math.log(w_a), log_b + math.log1p(-w_a))


def _masked(loss: Tensor, mask: Tensor | None) -> Tensor:
    if mask is None:
        return loss
    return torch.where(mask.bool(), loss, torch.zeros_like(loss))


def _kl_rows(lp: Tensor, lq: Tensor) -> tuple[Tensor, Tensor]:
    """(p, KL(p || q) per row) from log-probabilities, overwriting `lp` (the forward passes of
    the hand-written forward KLs below)."""
    p = lp.exp()
    # in place: no graph is recorded inside forward, and every vocabulary-sized buffer
    # not allocated is one pass of page faults saved on a CPU
    diff = lp.sub_(lq).masked_fill_(p == 0, 0.0)  # p = 0 terms are 0 even where log p = -inf
    # autocast (bf16 training) counts vecdot as a matmul and would cast p and diff to bf16
    with torch.autocast(p.device.type, enabled=False):
        return p, torch.linalg.vecdot(p, diff)


def _lse(logits: Tensor, log_probs: Tensor, tau: float) -> Tensor | None:
    """Each row's log-normaliser (log_probs = logits / tau - lse) where `logits` are 16-bit, else
    None. The hand-written forward KLs then keep those logits and this column for backward
    instead of float32 log-probabilities or probabilities (half the bytes); `_rebuilt` gets the
    float32 values back from them in one pass."""
    if logits.element_size() >= log_probs.element_size():
        return None
    # read at each row's largest logit (the largest log-prob is there too: rounding keeps the
    # order), where log_probs is nearest 0: lse is then as exact as the scaled logit itself,
    # and the rebuilt values differ from forward's by float32 rounding. amax, not max: without
    # the indices it is a quarter of the time on a CPU
    top = logits.amax(-1, keepdim=True).to(log_probs.dtype)
    return (top if tau == 1.0 else top / tau) - log_probs.amax(-1, keepdim=True)


def _rebuilt(kept: Tensor, lse: Tensor | None, tau: float, probs: bool = False) -> Tensor:
    """What forward kept: the tensor itself (lse None), or, from 16-bit logits and their `_lse`,
    the log-probabilities (with `probs` the probabilities) in a fresh float32 buffer."""
    if lse is None:
        return kept
    log_probs = torch.sub(kept, lse) if tau == 1.0 else torch.add(-lse, kept, alpha=1.0 / tau)
    return log_probs.exp_() if probs else log_probs


def _ce_and_shift(logits: Tensor, lq: Tensor, y: Tensor, tau: float) -> tuple[Tensor, Tensor | None]:
    """The CE -log q_1(y) per row from the student's log q_tau (`y`: (N, 1) targets), and the row
    shift with log q_1 = tau log q_tau + shift (None at tau = 1, where q_1 is q_tau): what a
    backward needs for the CE's q_1 without keeping the logits."""
    if tau == 1.0:
        return -lq.gather(-1, y).squeeze(-1), None
    s = logits.to(lq.dtype)
    ce = s.logsumexp(-1) - s.gather(-1, y).squeeze(-1)
    return ce, -ce - tau * lq.gather(-1, y).squeeze(-1)  # log q_1(y) - tau log q_tau(y), any column's


def _q1(lq: Tensor, shift: Tensor | None, tau: float) -> Tensor | None:
    """q_1 = exp(tau log q_tau + shift) in a fresh buffer, or None at tau = 1 (q_1 is q_tau)."""
    return None if shift is None else torch.add(shift.unsqueeze(-1), lq, alpha=tau).exp_()


def _kl_teacher_grad(p: Tensor, lq: Tensor, kl: Tensor, g: Tensor) -> Tensor:
    """d KL(p_tau || q_tau) / d teacher logits, times g = upstream gradient / tau (rows, 1)."""
    diff = (p.log() - lq).masked_fill_(p == 0, 0.0)
    return p * (diff - kl.unsqueeze(-1)) * g


class _ForwardKL(torch.autograd.Function):
    """KL(p || q) per row with a hand-written backward: d/ds = (q - p) / tau and
    d/dt = p (log p - log q - KL) / tau. Autograd through log-softmax, where, sub and mul
    runs about twice as many vocabulary-sized passes, a large share of a KD step on a CPU
    (profiled; benchmarks/README.md). Same values as `_kl` (tested
    against float64 formulas and gradcheck). From bf16 / float16 logits it keeps those for
    backward with one value per row (`_lse`), not float32 p and log q: half the bytes."""

    @staticmethod
    def forward(ctx: object, student_logits: Tensor, teacher_logits: Tensor, tau: float) -> Tensor:
        lq, lp = _log_probs(student_logits, tau), _log_probs(teacher_logits, tau)
        s_lse, t_lse = _lse(student_logits, lq, tau), _lse(teacher_logits, lp, tau)
        p, kl = _kl_rows(lp, lq)
        ctx.tau, ctx.dtypes = tau, (student_logits.dtype, teacher_logits.dtype)
        ctx.save_for_backward(
            p if t_lse is None else teacher_logits, t_lse, lq if s_lse is None else student_logits, s_lse, kl
        )
        return kl

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor | None, Tensor | None, None]:
        p, t_lse, lq, s_lse, kl = ctx.saved_tensors
        p, lq, fresh = _rebuilt(p, t_lse, ctx.tau, probs=True), _rebuilt(lq, s_lse, ctx.tau), s_lse is not None
        g = grad.unsqueeze(-1) if ctx.tau == 1.0 else grad.unsqueeze(-1) / ctx.tau
        g_student = g_teacher = None
        if ctx.needs_input_grad[1]:
            g_teacher = _kl_teacher_grad(p, lq, kl, g).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:  # a rebuilt log q is this call's own buffer: exp in place
            g_student = (lq.exp_() if fresh else lq.exp()).sub_(p).mul_(g).to(ctx.dtypes[0])
        return g_student, g_teacher, None


class _ForwardKLWithCE(torch.autograd.Function):
    """KL(p_tau || q_tau) and the cross-entropy -log q_1(y) per row from one log-softmax of the
    student: what a KD step with an SFT term needs, without F.cross_entropy's own log-softmax,
    its backward and the sum of two vocabulary-sized gradients.

    At tau = 1 the CE is a gather from log q. At another tau, log q_1 = tau log q_tau + shift with
    shift = tau logsumexp(s / tau) - logsumexp(s) per row, so only the shift is kept, not the
    logits. The student's gradient is (q_tau - p) g_kl / tau + (q_1 - onehot(y)) g_ce, written
    into one buffer (no more float32 error than the two losses apart: tested against
    float64). 16-bit logits are kept for backward as
    in _ForwardKL."""

    @staticmethod
    def forward(ctx: object, student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, tau: float):
        lq = _log_probs(student_logits, tau)
        y = targets.unsqueeze(-1)
        ce, shift = _ce_and_shift(student_logits, lq, y, tau)
        lp = _log_probs(teacher_logits, tau)
        s_lse, t_lse = _lse(student_logits, lq, tau), _lse(teacher_logits, lp, tau)
        p, kl = _kl_rows(lp, lq)
        ctx.tau, ctx.dtypes = tau, (student_logits.dtype, teacher_logits.dtype)
        kept = (p if t_lse is None else teacher_logits, t_lse, lq if s_lse is None else student_logits, s_lse)
        ctx.save_for_backward(*kept, kl, y, shift)
        return kl, ce

    @staticmethod
    def backward(ctx: object, g_kl: Tensor, g_ce: Tensor):
        p, t_lse, lq, s_lse, kl, y, shift = ctx.saved_tensors
        tau = ctx.tau
        p, lq, fresh = _rebuilt(p, t_lse, tau, probs=True), _rebuilt(lq, s_lse, tau), s_lse is not None
        g_student = g_teacher = None
        if ctx.needs_input_grad[1]:
            g_teacher = _kl_teacher_grad(p, lq, kl, g_kl.unsqueeze(-1) / tau).to(ctx.dtypes[1])
        if ctx.needs_input_grad[0]:
            a, c = g_kl.unsqueeze(-1).to(lq.dtype), g_ce.unsqueeze(-1).to(lq.dtype)
            q1 = _q1(lq, shift, tau)  # before lq goes
            q = lq.exp_() if fresh else lq.exp()  # a rebuilt log q is this call's own buffer
            if tau == 1.0:  # q (g_kl + g_ce) - p g_kl
                g = q.mul_(a + c).addcmul_(p, a, value=-1.0)
            else:  # (q_tau - p) g_kl / tau + q_1 g_ce, q_1 = exp(tau log q_tau + shift)
                a = a / tau
                g = q.mul_(a).addcmul_(p, a, value=-1.0).addcmul_(q1, c)
            g_student = g.scatter_add_(-1, y, -c).to(ctx.dtypes[0])  # the CE's -onehot(y) g_ce
        return g_student, g_teacher, None, None


def forward_kl_with_ce(
    student_logits: Tensor, teacher_logits: Tensor, targets: Tensor, *, tau: float = 1.0, beta: float | None = None
) -> tuple[Tensor, Tensor]:
    """(KL(p_tau || q_tau), -log q_1(targets)) per row, sharing the student's log-softmax (the same
    values as forward_kl and F.cross_entropy; srd.losses.kd uses it for the default divergence)."""
    return _ForwardKLWithCE.apply(student_logits, teacher_logits, targets, tau)


def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Forward KL(p_teacher || q_student): mode-covering; the classic KD loss."""
    return _masked(_ForwardKL.apply(student_logits, teacher_logits, tau), mask)


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Reverse KL(q_student || p_teacher): mode-seeking (MiniLLM)."""
    lp, lq = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    return _masked(_kl(lq, lp), mask)


def js_divergence(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Generalised JSD: beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta = 0.5 (default) is the symmetric JSD. DistiLLM/SRD code mixes m = 0.1 p + 0.9 q
    (beta = 0.1).
    """
    beta = 0.5 if beta is None else beta
    lp, lq = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    lm = _mix_log(lp, lq, beta)
    return _masked(beta * _kl(lp, lm) + (1.0 - beta) * _kl(lq, lm), mask)


def total_variation(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Total variation distance 0.5 * sum |p - q|."""
    lp, lq = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    return _masked(0.5 * (lp.exp() - lq.exp()).abs().sum(-1), mask)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Skew forward KL(p || beta p + (1 - beta) q), beta = 0.1 by default (DistiLLM)."""
    beta = 0.1 if beta is None else beta
    lp, lq = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    return _masked(_kl(lp, _mix_log(lp, lq, beta)), mask)


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    tau: float = 1.0,
    beta: float | None = None,
) -> Tensor:
    """Skew reverse KL(q || (1 - beta) p + beta q), beta = 0.1 by default (DistiLLM)."""
    beta = 0.1 if beta is None else beta
    lp, lq = _log_probs(teacher_logits, tau), _log_probs(student_logits, tau)
    return _masked(_kl(lq, _mix_log(lq, lp, beta)), mask)


DivergenceFn = Callable[..., Tensor]


@dataclass(frozen=True)
class Divergence:
    fn: DivergenceFn
    # Whether the reference implementation multiplies this divergence by tau^2
    # (loss.tau_squared = "reference" reproduces that inconsistent choice).
    reference_tau_squared: bool
    # (student logits, teacher logits, targets, tau=, beta=) -> (divergence, CE) per row from one
    # log-softmax of the student, where the divergence has such a form (fkl)
    with_ce: Callable[..., tuple[Tensor, Tensor]] | None = None


DIVERGENCES: dict[str, Divergence] = {
    "fkl": Divergence(forward_kl, True, forward_kl_with_ce),
    "rkl": Divergence(reverse_kl, False),
    "jsd": Divergence(js_divergence, True),
    "tvd": Divergence(total_variation, False),
    "skl": Divergence(skew_forward_kl, False),
    "srkl": Divergence(skew_reverse_kl, True),
}


def register_divergence(
    name: str,
    fn: DivergenceFn,
    reference_tau_squared: bool = True,
    with_ce: Callable[..., tuple[Tensor, Tensor]] | None = None,
) -> None:
    """Add a divergence by name so configs can use `loss.divergence: <name>`. `with_ce`, if
    given, computes (divergence, CE) per row together (see forward_kl_with_ce) from float32
    logits, or with loss.recompute_log_probs from the heads' bf16 ones as they are (compute in
    float32, as `_log_probs` does); without it the CE is taken apart with F.cross_entropy."""
    if name in DIVERGENCES:
        raise ValueError(f"divergence {name!r} is already registered")
    DIVERGENCES[name] = Divergence(fn, reference_tau_squared, with_ce)


def get_divergence(name: str) -> Divergence:
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise KeyError(f"unknown divergence {name!r}; registered: {sorted(DIVERGENCES)}") from None


def tau_scale(name: str, tau: float, mode: str) -> float:
    """The factor in front of D: tau^2 (paper Eq. 6), 1, or the reference code's per-loss choice."""
    if mode == "all" or (mode == "reference" and get_divergence(name).reference_tau_squared):
        return tau * tau
    return 1.0
