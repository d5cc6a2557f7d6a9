"""The cached sparse teacher: exact when k covers all but one token, a lower bound otherwise,
and training from the cache never runs the teacher."""

from __future__ import annotations

import json

import pytest
import torch

from srd.cli import main
from srd.losses import DIVERGENCES
from srd.losses.kd import SparseTeacher, kd_loss_sums
from srd.train.teacher_cache import sparse_buckets
from tests.test_srd_run import _args, srd_data  # noqa: F401


def _buckets(t_logits: torch.Tensor, k: int, tau: float = 1.0) -> SparseTeacher:
    """What the cache serves for these teacher logits at temperature tau."""
    return SparseTeacher(*sparse_buckets(t_logits, k, (tau,)))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_teacher_with_all_but_one_token_is_exact(divergence, tau):
    torch.manual_seed(0)
    v, n = 12, 7
    s = torch.randn(n, v, dtype=torch.float64)
    t = torch.randn(n, v, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,))
    dense = kd_loss_sums(s, t, y, divergence=divergence, tau=tau, chunk_size=3)
    sparse = kd_loss_sums(s, _buckets(t, v - 1, tau), y, divergence=divergence, tau=tau, chunk_size=3)
    assert sparse.kd.item() == pytest.approx(dense.kd.item(), rel=1e-6)
    assert sparse.ce.item() == pytest.approx(dense.ce.item(), rel=1e-12)


def test_sparse_forward_kl_is_a_lower_bound_at_tau_1():
    """Merging tokens into one bucket cannot increase a KL (data processing inequality)."""
    torch.manual_seed(1)
    s, t = torch.randn(20, 50, dtype=torch.float64), torch.randn(20, 50, dtype=torch.float64) * 3
    y = torch.randint(0, 50, (20,))
    dense = kd_loss_sums(s, t, y, divergence="fkl", tau=1.0).kd.item()
    for k in (1, 5, 20):
        sparse = kd_loss_sums(s, _buckets(t, k), y, divergence="fkl", tau=1.0).kd.item()
        assert 0.0 <= sparse <= dense + 1e-9
    assert kd_loss_sums(s, _buckets(t, 20), y, divergence="fkl", tau=1.0).kd.item() > 0.5 * dense


@pytest.mark.parametrize("tau", [1.0, 1.5, 2.0])
def test_cached_buckets_are_exact_at_every_cached_temperature(tau):
    """At each cached tau the buckets give exactly the teacher's top-k probabilities at tau and its
    tail mass at tau, so forward KL over buckets is a lower bound of the dense one at that tau too.
    (A single tail logit fitted at tau 1 and reused at tau 2 fails both: the SRD curriculum's
    later stages train at tau 1.5-2.)"""
    from srd.train.teacher_cache import at_temperature

    torch.manual_seed(2)
    s, t = torch.randn(30, 64, dtype=torch.float64), torch.randn(30, 64, dtype=torch.float64) * 3
    y = torch.randint(0, 64, (30,))
    ids, buckets = sparse_buckets(t, 8, (1.0, 1.5, 2.0))
    assert buckets.shape == (30, 8 + 3)
    cached = at_temperature(ids, buckets, (1.0, 1.5, 2.0), tau)
    p = torch.softmax(t / tau, -1)
    p_buckets = torch.softmax(cached.buckets / tau, -1)
    assert torch.allclose(p_buckets[:, :8], p.gather(-1, ids), atol=1e-12)
    assert torch.allclose(p_buckets[:, 8], 1 - p.gather(-1, ids).sum(-1), atol=1e-12)
    dense = kd_loss_sums(s, t, y, divergence="fkl", tau=tau).kd.item()
    sparse = kd_loss_sums(s, cached, y, divergence="fkl", tau=tau).kd.item()
    assert 0.0 <= sparse <= dense + 1e-9 and sparse > 0.3 * dense
    with pytest.raises(ValueError, match="not 3.0"):
        at_temperature(ids, buckets, (1.0, 1.5, 2.0), 3.0)


def test_an_srd_run_caches_every_stage_temperature(tmp_path, tiny_models, srd_data):  # noqa: F811
    """`srd run` with the cache: one build serves stages at tau 1, 1.5 and 2 (no rebuild)."""
    args = _args("run", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8", "data.dev=null")
    assert main(args) == 0
    meta = json.loads((tmp_path / "x" / "teacher-cache" / "meta.json").read_text())
    assert meta["taus"] == [1.0, 1.5, 2.0]
    shards = sorted(p.name for p in (tmp_path / "x" / "teacher-cache").glob("shard-*.buckets.npy"))
    assert len(shards) == 3  # stage 1 built its rows, stages 2 and 3 added theirs, nothing rebuilt
    import numpy as np

    assert np.load(tmp_path / "x" / "teacher-cache" / shards[0]).shape[1] == 8 + 3
    # the run's cache time is at least what the cache records for its shards
    from srd.train.teacher_cache import TeacherCache

    built = TeacherCache.build_seconds(tmp_path / "x" / "teacher-cache")
    results = json.loads((tmp_path / "x" / "results.json").read_text())
    assert built > 0 and results["teacher_cache_s"] >= round(built, 3)


def test_training_from_the_cache_never_runs_the_teacher(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    args = _args("train", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8", "train.epochs=2", "data.dev=null")
    import srd.train.loop as loop

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran during training despite the cache")

    monkeypatch.setattr(loop, "teacher_features", no_teacher)
    assert main(args) == 0
    run = tmp_path / "x"
    index = json.loads((run / "teacher-cache" / "index.json").read_text())
    assert len(index) == 20 and all(n > 0 for _, _, n in index.values())
    done = json.loads((run / "done.json").read_text())
    assert done["teacher_cache_s"] > 0 and done["steps"] == 20  # 2 epochs x 10 batches of 2
    rows = [json.loads(x) for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in rows)


def test_an_interrupted_cache_build_keeps_its_finished_shards(tmp_path, tiny_models, tokenizer, monkeypatch):
    """Shards are written as they fill; a build that dies keeps them, the next computes only the rest,
    and the rows are the same as one uninterrupted build's."""
    from transformers import AutoModelForCausalLM

    import srd.train.teacher_cache as step  # where the build looks the function up
    from srd.data.tokenize import Encoded
    from srd.train.teacher_cache import TeacherCache

    teacher = AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"]).eval()
    g = torch.Generator().manual_seed(0)
    enc = []
    for i in range(10):
        n_prompt, n_resp = 3 + i % 4, 2 + i % 5
        toks = torch.randint(5, len(tokenizer), (n_prompt + n_resp,), generator=g).tolist()
        enc.append(Encoded(id=f"e{i}", input_ids=toks, labels=[-100] * n_prompt + toks[n_prompt:]))
    meta = {"teacher": "tiny", "top_k": 4, "vocab": len(tokenizer), "tokenisation": []}

    whole = TeacherCache(tmp_path / "whole", meta)
    assert whole.build(teacher, tokenizer, enc, batch_size=2) == 10
    assert len({v[0] for v in whole.index.values()}) == 1  # one shard

    real, calls = step.target_features, {"n": 0}

    def dies_on_the_fourth_batch(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(step, "target_features", dies_on_the_fourth_batch)
    parts = TeacherCache(tmp_path / "parts", meta)
    with pytest.raises(KeyboardInterrupt):
        parts.build(teacher, tokenizer, enc, batch_size=2, shard_rows=1)  # a shard per batch
    kept = json.loads((tmp_path / "parts" / "index.json").read_text())
    spent = TeacherCache.build_seconds(tmp_path / "parts")  # the finished shards' time is on record
    assert spent > 0 and TeacherCache.build_seconds(tmp_path / "nowhere") == 0.0
    longest_first = [e.id for e in sorted(enc, key=lambda e: -len(e.input_ids))]  # the build's order
    assert sorted(kept) == sorted(longest_first[:6])  # the three batches before the failure
    monkeypatch.setattr(step, "target_features", real)
    parts = TeacherCache(tmp_path / "parts", meta)  # a new process
    assert parts.build(teacher, tokenizer, enc, batch_size=2, shard_rows=1) == 4
    assert TeacherCache.build_seconds(tmp_path / "parts") > spent  # both invocations' shards
    assert len({v[0] for v in parts.index.values()}) == 5
    ids = [e.id for e in enc]
    a, b = whole.rows(ids, "cpu"), parts.rows(ids, "cpu")
    assert torch.equal(a.ids, b.ids) and torch.allclose(a.buckets, b.buckets, atol=1e-5)


def test_a_cache_keeps_the_precision_its_teacher_ran_in(tiny_models, tokenizer):
    """Rows a bf16 teacher computed are not served where the teacher runs in float32 (`auto`
    resolving otherwise on another machine): a teacher whose weights are bf16 values has the same
    fingerprint in both dtypes, so the cache's key names a non-float32 dtype (and float32 none:
    older caches hold)."""
    import copy

    from transformers import AutoModelForCausalLM

    from srd.config import load_config
    from srd.models.features import model_fingerprint
    from srd.train.loop import teacher_cache_meta

    fp32 = AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"]).eval()
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_(p.bfloat16().float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert model_fingerprint(fp32) == model_fingerprint(bf16)
    cfg = load_config(None, ["loss.teacher_top_k=8"])
    a, b = (teacher_cache_meta(cfg, m, tokenizer, False, 1.0) for m in (fp32, bf16))
    assert "teacher_dtype" not in a and b["teacher_dtype"] == "bfloat16"
    assert {k: v for k, v in b.items() if k != "teacher_dtype"} == a


def _reference_buckets_and_ce(s: torch.Tensor, ids: torch.Tensor, y: torch.Tensor, tau: float):
    """The cache path's student side by autograd (the bucket formula of sparse_student_buckets,
    kept in float64 here) and F.cross_entropy."""
    lq = torch.log_softmax(s / tau, dim=-1)
    rest = lq.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(-80.0)
    return torch.cat([lq.gather(-1, ids), rest], -1) * tau, torch.nn.functional.cross_entropy(s, y, reduction="none")


def _ids(n: int, v: int, k: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(n)])


@pytest.mark.parametrize("tau", [1.0, 1.7])
def test_student_buckets_hand_written_backward_gradcheck(tau):
    from srd.losses.kd import student_buckets_with_ce

    g = torch.Generator().manual_seed(3)
    s = (torch.randn(5, 11, generator=g, dtype=torch.float64) * 2).requires_grad_(True)
    ids, y = _ids(5, 11, 3, seed=4), torch.tensor([0, 3, 10, 4, 4])
    assert torch.autograd.gradcheck(lambda a: student_buckets_with_ce(a, ids, y, tau), (s,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_student_buckets_equal_the_autograd_formula_also_below_the_rest_floor(tau):
    """Values and gradients equal the formula's by autograd, with random bucket weights, where a
    row's rest mass is below the floor (e^-80: the rest bucket is a constant there) and where the
    ids hold almost all the mass (a large 1 / r)."""
    from srd.losses.kd import student_buckets_with_ce

    g = torch.Generator().manual_seed(5)
    n, v, k = 6, 40, 5
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * 3
    ids, y = _ids(n, v, k, seed=6), torch.randint(0, v, (n,), generator=g)
    s[0].fill_(-200.0)
    s[0, ids[0]] = 0.0  # rest mass about e^-196: floored
    s[1, ids[1]] += 60.0  # rest mass about e^-60: kept, 1 / r about e^60
    w_b = torch.randn(n, k + 1, generator=g, dtype=torch.float64)
    w_ce = torch.randn(n, generator=g, dtype=torch.float64)
    a, b = s.clone().requires_grad_(True), s.clone().requires_grad_(True)
    ours = student_buckets_with_ce(a, ids, y, tau)
    ref = _reference_buckets_and_ce(b, ids, y, tau)
    for x, want in zip(ours, ref):
        torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    ((ours[0] * w_b).sum() + (ours[1] * w_ce).sum()).backward()
    ((ref[0] * w_b).sum() + (ref[1] * w_ce).sum()).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=1e-12)


def test_student_buckets_from_bf16_logits_keep_half_the_bytes():
    """With bf16 logits (loss.recompute_log_probs) the cache path keeps them, not float32 log-probs,
    for the same values and gradients to float32 rounding."""
    from srd.losses.kd import student_buckets_with_ce
    from tests.test_losses import _saved_bytes

    g = torch.Generator().manual_seed(7)
    s = (torch.randn(16, 301, generator=g) * 3).bfloat16()
    ids, y = _ids(16, 301, 8, seed=8), torch.randint(0, 301, (16,), generator=g)
    out = []
    for upcast in (True, False):
        a = s.clone().requires_grad_(True)
        logits = a.float() if upcast else a
        (buckets, ce), kept = _saved_bytes(lambda logits=logits: student_buckets_with_ce(logits, ids, y, 1.0))
        (buckets.sum() + ce.sum()).backward()
        out.append((buckets, ce, a.grad, kept))
    (b32, ce32, g32, kept32), (b16, ce16, g16, kept16) = out
    assert torch.equal(b32, b16) and torch.equal(ce32, ce16)
    torch.testing.assert_close(g16.float(), g32.float(), rtol=2**-7, atol=1e-6)
    assert kept16 < 0.6 * kept32
