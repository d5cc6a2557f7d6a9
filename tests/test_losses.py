"""Divergences vs independent float64 formulas, masking, chunking, gradients, bf16."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from srd.losses import DIVERGENCES, combine, get_divergence, kd_loss_sums, register_divergence, tau_scale

NAMES = sorted(DIVERGENCES)


def _softmax64(z: np.ndarray, tau: float) -> np.ndarray:
    z = z.astype(np.float64) / tau
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _kl64(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):  # a = 0 terms are 0 (masked by where)
        return np.sum(np.where(a > 0, a * (np.log(a) - np.log(b)), 0.0), axis=-1)


def reference(name: str, s: np.ndarray, t: np.ndarray, tau: float, beta: float | None) -> np.ndarray:
    """Textbook definitions (docs/method.md, section 1) in float64 numpy, independent of srd code."""
    p, q = _softmax64(t, tau), _softmax64(s, tau)
    if name == "fkl":
        return _kl64(p, q)
    if name == "rkl":
        return _kl64(q, p)
    if name == "jsd":
        b = 0.5 if beta is None else beta
        m = b * p + (1 - b) * q
        return b * _kl64(p, m) + (1 - b) * _kl64(q, m)
    if name == "tvd":
        return 0.5 * np.abs(p - q).sum(-1)
    if name == "skl":
        b = 0.1 if beta is None else beta
        return _kl64(p, b * p + (1 - b) * q)
    if name == "srkl":
        b = 0.1 if beta is None else beta
        return _kl64(q, (1 - b) * p + b * q)
    raise KeyError(name)


def _logits(shape=(3, 5, 11), seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale, torch.randn(*shape, generator=g) * scale


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("beta", [None, 0.3])
def test_matches_float64_formula(name, tau, beta):
    s, t = _logits()
    got = get_divergence(name).fn(s.double(), t.double(), None, tau=tau, beta=beta).numpy()
    want = reference(name, s.numpy(), t.numpy(), tau, beta)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)
    # float32 inputs are computed in float32 and stay close
    got32 = get_divergence(name).fn(s, t, None, tau=tau, beta=beta).numpy()
    np.testing.assert_allclose(got32, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_distributions(name):
    s, _ = _logits()
    out = get_divergence(name).fn(s.double(), s.double().clone(), None, tau=1.5)
    assert torch.all(out.abs() < 1e-12)
    # shifting logits by a constant does not change the distribution
    out = get_divergence(name).fn(s.double(), s.double() + 7.0, None)
    assert torch.all(out.abs() < 1e-10)


@pytest.mark.parametrize("name", NAMES)
def test_nonnegative_and_mask_zeroes(name):
    s, t = _logits()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, :2] = True
    out = get_divergence(name).fn(s, t, mask)
    assert torch.all(out >= -1e-6)
    assert torch.all(out[~mask] == 0)
    assert torch.all(out[mask] > 0)
    full_mask = get_divergence(name).fn(s, t, torch.zeros(3, 5))
    assert torch.equal(full_mask, torch.zeros(3, 5))


def test_direction_of_kl_is_pinned():
    # p = teacher peaked on token 0; q = student uniform. KL(p||q) != KL(q||p), by hand:
    t = torch.tensor([[math.log(0.9), math.log(0.05), math.log(0.05)]], dtype=torch.float64)
    s = torch.zeros(1, 3, dtype=torch.float64)
    kl_pq = 0.9 * math.log(0.9 / (1 / 3)) + 2 * 0.05 * math.log(0.05 / (1 / 3))
    kl_qp = (1 / 3) * (math.log((1 / 3) / 0.9) + 2 * math.log((1 / 3) / 0.05))
    assert get_divergence("fkl").fn(s, t).item() == pytest.approx(kl_pq, rel=1e-12)
    assert get_divergence("rkl").fn(s, t).item() == pytest.approx(kl_qp, rel=1e-12)
    assert abs(kl_pq - kl_qp) > 0.1


def test_masked_vocabulary_entries_do_not_give_nan():
    s, t = _logits((2, 7))
    t[:, 3] = float("-inf")  # teacher puts exactly zero mass here
    s.requires_grad_(True)
    # KL(q || p) is truly infinite when p has a zero the student does not share
    assert torch.isinf(get_divergence("rkl").fn(s, t).sum())
    for name in [n for n in NAMES if n != "rkl"]:
        out = get_divergence(name).fn(s, t).sum()
        (g,) = torch.autograd.grad(out, s)
        assert torch.isfinite(out) and torch.all(torch.isfinite(g)), name


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck(name):
    s, t = _logits((2, 6), seed=3, scale=1.0)
    s = s.double().requires_grad_(True)
    t = t.double()
    fn = get_divergence(name).fn
    assert torch.autograd.gradcheck(lambda x: fn(x, t, None, tau=1.7, beta=0.3), (s,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_forward_kl_hand_written_backward_gradcheck_both_inputs(tau):
    s, t = _logits((3, 6), seed=4, scale=1.5)
    s, t = s.double().requires_grad_(True), t.double().requires_grad_(True)
    fn = get_divergence("fkl").fn
    assert torch.autograd.gradcheck(lambda a, b: fn(a, b, None, tau=tau), (s, t), eps=1e-6, atol=1e-6)


def test_forward_kl_equals_autograd_formula_with_zero_mass_tokens():
    """The fused forward KL gives autograd's values and gradients, where the teacher puts
    exactly zero mass on some tokens (log p = -inf) too."""
    from srd.losses.divergences import _kl, _log_probs

    s, t = _logits((4, 5, 33), seed=6, scale=3.0)
    t[..., 7] = float("-inf")
    for tau in (1.0, 2.0):
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        ours = get_divergence("fkl").fn(a, b, tau=tau)
        ga_ours, gb_ours = torch.autograd.grad(ours.sum(), (a, b))
        a2, b2 = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        ref = _kl(_log_probs(b2, tau), _log_probs(a2, tau))
        ga_ref, gb_ref = torch.autograd.grad(ref.sum(), (a2, b2))
        torch.testing.assert_close(ours, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ga_ours, ga_ref, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(gb_ours, gb_ref, rtol=1e-5, atol=1e-6)
        assert torch.all(gb_ours[..., 7] == 0)


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_forward_kl_with_ce_matches_float64_formulas(tau):
    """The fused forward KL + CE (one log-softmax of the student) gives the textbook KL and
    -log softmax(s)[y] at tau = 1 for the CE, also where the teacher puts zero mass on a token."""
    from srd.losses import forward_kl_with_ce

    s, t = _logits((6, 13), seed=8, scale=3.0)
    t[:, 4] = float("-inf")
    y = torch.tensor([0, 4, 12, 7, 7, 3])
    kl, ce = forward_kl_with_ce(s.double(), t.double(), y, tau=tau)
    np.testing.assert_allclose(kl.numpy(), reference("fkl", s.numpy(), t.numpy(), tau, None), rtol=1e-10, atol=1e-12)
    want_ce = -np.log(_softmax64(s.numpy(), 1.0)[np.arange(6), y.numpy()])
    np.testing.assert_allclose(ce.numpy(), want_ce, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_forward_kl_with_ce_gradcheck_both_inputs(tau):
    from srd.losses import forward_kl_with_ce

    s, t = _logits((4, 7), seed=9, scale=1.5)
    s, t = s.double().requires_grad_(True), t.double().requires_grad_(True)
    y = torch.tensor([1, 6, 0, 1])
    # a weighted sum of both outputs, so the gradient of each and of their mix is checked
    assert torch.autograd.gradcheck(lambda a, b: forward_kl_with_ce(a, b, y, tau=tau), (s, t), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_ce_path_equals_separate_losses_in_float32(tau):
    """kd_loss_sums with forward KL shares one log-softmax between CE and KD: its sums and
    gradients equal F.cross_entropy + forward_kl's in float32, also under bf16 autocast."""
    s, t = _logits((64, 301), seed=10, scale=4.0)
    y = torch.randint(0, 301, (64,), generator=torch.Generator().manual_seed(1))
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ce_ref = torch.nn.functional.cross_entropy(a, y, reduction="sum")
    kd_ref = get_divergence("fkl").fn(a, t, tau=tau).sum()
    (0.3 * ce_ref + 0.7 * kd_ref).backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums = kd_loss_sums(b, t, y, divergence="fkl", tau=tau, chunk_size=24)
    assert sums.ce.dtype == sums.kd.dtype == torch.float32
    (0.3 * sums.ce + 0.7 * sums.kd).backward()
    torch.testing.assert_close(sums.ce, ce_ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(sums.kd, kd_ref.detach(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7)


def _saved_bytes(fn):
    """fn()'s result and the bytes autograd keeps for its backward (saved_tensors_hooks; a
    storage saved twice, such as autocast's cached bf16 copy of a weight, counts once)."""
    kept = {}

    def pack(x):
        kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        out = fn()
    return out, sum(kept.values())


@pytest.mark.parametrize("joint", [False, True])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_forward_kl_keeps_bf16_logits_not_float32_log_probs(joint, tau):
    """With bf16 logits the hand-written forward KLs keep those for backward (and one value per
    row), not float32 p and log q: half the bytes; the same values as the same logits given in
    float32, and gradients that differ by float32 rounding at most (so rarely in their bf16 bits)."""
    from srd.losses import forward_kl, forward_kl_with_ce

    s, t = (x.bfloat16() for x in _logits((16, 257), seed=12, scale=4.0))
    y = torch.randint(0, 257, (16,), generator=torch.Generator().manual_seed(2))

    def loss(a, b):
        if joint:
            kl, ce = forward_kl_with_ce(a, b, y, tau=tau)
            return (0.7 * kl + 0.3 * ce).sum()
        return forward_kl(a, b, tau=tau).sum()

    results = []
    for upcast in (False, True):
        a, b = s.clone().requires_grad_(True), t.clone().requires_grad_(True)
        ins = (a.float(), b.float()) if upcast else (a, b)
        out, kept = _saved_bytes(lambda ins=ins: loss(*ins))
        out.backward()
        results.append((out, a.grad, b.grad, kept))
    (out16, ga16, gb16, kept16), (out32, ga32, gb32, kept32) = results
    assert torch.equal(out16, out32)
    for low, high in ((ga16, ga32), (gb16, gb32)):
        assert (low != high).float().mean() < 0.01
        torch.testing.assert_close(low.float(), high.float(), rtol=2**-7, atol=1e-6)  # one bf16 step
    vocab_bytes = s.numel() * 4  # one float32 (16, 257) tensor
    assert kept32 >= 2 * vocab_bytes  # float32 p and log q
    assert kept16 <= vocab_bytes + 16 * 4 * 8  # two bf16 logit tensors plus per-row values


@pytest.mark.parametrize("tau", [1.0, 2.0, 0.7])
def test_log_probs_rebuilt_from_bf16_logits_match_forwards_to_float32_rounding(tau):
    """What backward rebuilds from 16-bit logits and one value per row equals the float32
    log-softmax forward computed, to a few float32 steps of the scaled logits' size, also where
    a logit is -inf (a token with zero mass stays at zero)."""
    from srd.losses.divergences import _log_probs, _lse, _rebuilt

    s, _ = _logits((32, 1001), seed=13, scale=6.0)
    s = (s + 40.0).bfloat16()  # large logits: their float32 rounding is what the rebuild may add
    s[:, 5] = float("-inf")
    forward = _log_probs(s, tau)
    again = _rebuilt(s, _lse(s, forward, tau), tau)
    assert again.dtype == torch.float32 and torch.all(again[:, 5] == float("-inf"))
    finite = forward.isfinite()
    ulp = torch.finfo(torch.float32).eps * (s.float().abs().amax() / tau)
    assert (again - forward)[finite].abs().max() <= 4 * ulp
    assert _lse(s.float(), forward, tau) is None and _rebuilt(forward, None, tau) is forward


def _bf16_chunked_loss(lean: bool, recompute: bool = False):
    torch.manual_seed(3)
    n, h, v = 96, 16, 509
    hs = torch.randn(n, h, requires_grad=True)
    ht = torch.randn(n, h)
    ws, wt = torch.randn(v, h, requires_grad=True), torch.randn(v, h)
    y = torch.randint(0, v, (n,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sums, kept = _saved_bytes(
            lambda: kd_loss_sums(
                hs,
                ht,
                y,
                chunk_size=16,
                student_head=lambda x: F.linear(x, ws),
                teacher_head=lambda x: F.linear(x, wt),
                recompute=recompute,
                recompute_log_probs=lean,
            )
        )
    assert sums.kd.dtype == torch.float32
    (sums.ce + sums.kd).backward()
    return sums, kept, (hs.grad, ws.grad), 2 * n * v * 4  # float32 p and log q: 2 x n x v x 4 bytes


def test_recompute_log_probs_keeps_half_the_bytes_for_the_same_gradients():
    """The chunked loss with bf16 heads and the logits kept (loss.recompute_chunks=false): with
    loss.recompute_log_probs it holds about the bf16 logits of both models for backward, not
    float32 log-probabilities, and gives the same sums and gradients (to float32 rounding)."""
    sums, kept, grads, float32_bytes = _bf16_chunked_loss(lean=False)
    lean_sums, lean_kept, lean_grads, _ = _bf16_chunked_loss(lean=True)
    assert kept > float32_bytes
    # two bf16 logits are half of float32 p and log q; the rest is the bf16 weights and hidden
    # states the heads' matmuls keep
    assert lean_kept < 0.6 * float32_bytes
    assert torch.equal(sums.ce, lean_sums.ce) and torch.equal(sums.kd, lean_sums.kd)
    for a, b in zip(grads, lean_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    # inside activation checkpoints (loss.recompute_chunks=true) too
    ck_sums, _, ck_grads, _ = _bf16_chunked_loss(lean=True, recompute=True)
    assert torch.equal(ck_sums.ce, lean_sums.ce) and torch.equal(ck_sums.kd, lean_sums.kd)
    for a, b in zip(ck_grads, lean_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_bf16_inputs_close_to_float32(name):
    s, t = _logits((4, 9, 64), seed=5, scale=2.0)
    ref = get_divergence(name).fn(s, t).sum()
    low = get_divergence(name).fn(s.bfloat16(), t.bfloat16()).sum()
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(ref.item(), rel=3e-2, abs=1e-3)


@pytest.mark.parametrize("name", NAMES)
def test_divergences_stay_float32_under_bf16_autocast(name):
    """bf16 training runs the loss inside autocast: no divergence may let it round its float32
    arithmetic to bf16 (forward KL's vecdot counted as a matmul did), values or gradients."""
    s, t = _logits((4, 9, 64), seed=6, scale=2.0)
    fn = get_divergence(name).fn
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ref = fn(a, t, tau=2.0)
    ref.sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fn(b, t, tau=2.0)
    out.sum().backward()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b.grad, a.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_equals_unchunked_with_heads(name):
    torch.manual_seed(0)
    n, h, v = 37, 8, 19
    hs = torch.randn(n, h, dtype=torch.float64, requires_grad=True)
    ht = torch.randn(n, h, dtype=torch.float64)
    ws = torch.randn(v, h, dtype=torch.float64, requires_grad=True)
    wt = torch.randn(v, h, dtype=torch.float64)
    y = torch.randint(0, v, (n,))
    results = []
    for chunk, recompute in ((n, True), (5, True), (1, True), (5, False)):
        sums = kd_loss_sums(
            hs,
            ht,
            y,
            divergence=name,
            tau=2.0,
            chunk_size=chunk,
            student_head=lambda x: x @ ws.T,
            teacher_head=lambda x: x @ wt.T,
            recompute=recompute,
        )
        loss = combine(sums, alpha=0.3, kd_scale=4.0, denominator=n)
        g_h, g_w = torch.autograd.grad(loss, (hs, ws))
        results.append((loss.detach(), g_h, g_w, sums.ce.detach(), sums.kd.detach()))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # and against the plain formula on full logits
    s_logits, t_logits = (hs @ ws.T).detach(), ht @ wt.T
    want_kd = reference(name, s_logits.numpy(), t_logits.numpy(), 2.0, None).sum()
    want_ce = torch.nn.functional.cross_entropy(s_logits, y, reduction="sum").item()
    assert results[0][4].item() == pytest.approx(want_kd, rel=1e-9)
    assert results[0][3].item() == pytest.approx(want_ce, rel=1e-9)


def test_empty_batch_gives_zero_not_nan():
    hs = torch.randn(0, 4, requires_grad=True)
    sums = kd_loss_sums(
        hs, torch.randn(0, 4), torch.zeros(0, dtype=torch.long), student_head=lambda x: x, teacher_head=lambda x: x
    )
    loss = combine(sums, alpha=0.5, kd_scale=1.0, denominator=0)
    assert loss.item() == 0.0 and sums.n_tokens == 0
    loss.backward()
    assert torch.equal(hs.grad, torch.zeros(0, 4))


def test_gradient_accumulation_reduction_is_per_step():
    """Two micro-batches divided by the step's token count == one batch of all tokens."""
    torch.manual_seed(1)
    s, t = torch.randn(10, 7, dtype=torch.float64, requires_grad=True), torch.randn(10, 7, dtype=torch.float64)
    y = torch.randint(0, 7, (10,))
    whole = combine(kd_loss_sums(s, t, y), alpha=0.5, kd_scale=1.0, denominator=10)
    (g_whole,) = torch.autograd.grad(whole, s)
    parts = [
        combine(kd_loss_sums(s[sl], t[sl], y[sl]), alpha=0.5, kd_scale=1.0, denominator=10)
        for sl in (slice(0, 3), slice(3, 10))
    ]
    (g_parts,) = torch.autograd.grad(parts[0] + parts[1], s)
    torch.testing.assert_close(whole, parts[0] + parts[1])
    torch.testing.assert_close(g_whole, g_parts)


def test_tau_scaling_modes():
    assert tau_scale("rkl", 2.0, "all") == 4.0
    assert tau_scale("rkl", 2.0, "none") == 1.0
    assert tau_scale("rkl", 2.0, "reference") == 1.0  # the reference code skips rkl, tvd, skl
    assert tau_scale("fkl", 2.0, "reference") == 4.0
    assert tau_scale("srkl", 2.0, "reference") == 4.0


def test_registry_add_and_errors():
    with pytest.raises(KeyError, match="registered"):
        get_divergence("nope")
    with pytest.raises(ValueError):
        register_divergence("fkl", lambda *a, **k: None)
    register_divergence("_test_zero", lambda s, t, mask=None, **hp: torch.zeros(s.shape[:-1]))
    try:
        assert "_test_zero" in DIVERGENCES
    finally:
        DIVERGENCES.pop("_test_zero")


def test_a_registered_divergence_with_a_joint_ce_is_used_for_both_sums():
    """kd_loss_sums takes the CE from a registered divergence's `with_ce` when it has one, and
    from F.cross_entropy when not."""
    calls = []

    def with_ce(s, t, y, *, tau, beta):
        calls.append(tau)
        return torch.full(s.shape[:-1], 2.0), torch.full(s.shape[:-1], 3.0)

    register_divergence("_test_joint", lambda s, t, mask=None, **hp: torch.zeros(s.shape[:-1]), with_ce=with_ce)
    register_divergence("_test_apart", lambda s, t, mask=None, **hp: torch.zeros(s.shape[:-1]))
    try:
        s, t = _logits((10, 7), seed=11)
        y = torch.randint(0, 7, (10,))
        joint = kd_loss_sums(s, t, y, divergence="_test_joint", tau=1.5, chunk_size=4)
        assert calls == [1.5, 1.5, 1.5] and joint.ce.item() == 30.0 and joint.kd.item() == 20.0
        apart = kd_loss_sums(s, t, y, divergence="_test_apart", chunk_size=4)
        want = torch.nn.functional.cross_entropy(s, y, reduction="sum")
        assert apart.ce.item() == pytest.approx(want.item(), rel=1e-6) and apart.kd.item() == 0.0
    finally:
        DIVERGENCES.pop("_test_joint")
        DIVERGENCES.pop("_test_apart")
