"""The teacher store: its sparse buckets are exact when k covers all but one token and a lower bound
otherwise; stored rows are shared by every run with the same teacher and k, found by their tokens;
training from the store never runs the teacher; builds resume, lock, and find a flipped byte."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from srd.cli import main
from srd.losses import DIVERGENCES
from srd.losses.kd import SparseTeacher, kd_loss_sums
from srd.train.teacher_store import sparse_buckets
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
    from srd.train.teacher_store import at_temperature

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


def _entry(root):
    from srd.train.teacher_store import entries

    found = entries(root)
    assert len(found) == 1, found
    return found[0]


def test_an_srd_run_stores_every_stage_temperature_once(tmp_path, tiny_models, srd_data, teacher_store):  # noqa: F811
    """`srd run` with the store: stage 1 builds its rows (and the dev rows) for tau 1, 1.5 and 2,
    stages 2 and 3 add only their new rows; the run records what it built and what its rows cost."""
    args = _args("run", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8")
    assert main(args) == 0
    entry = _entry(teacher_store)
    shards = json.loads((entry / "shards.json").read_text())
    assert len(shards) == 3 and all(s["taus"] == [1.0, 1.5, 2.0] for s in shards.values())
    import numpy as np

    logits = np.load(entry / "shard-00000.logits.npy")
    assert logits.shape[1] == 8 + 3 and logits.dtype == np.float16 and (logits[:, 0] == 0).all()
    assert np.load(entry / "shard-00000.ids.npy").dtype == np.uint16
    record = json.loads((tmp_path / "x" / "teacher-store.json").read_text())
    results = json.loads((tmp_path / "x" / "results.json").read_text())
    built = sum(s["seconds"] for s in shards.values())
    assert record["built_s"] == pytest.approx(built, abs=0.01) and results["teacher_built_s"] >= built - 0.01
    # the rows it trained on (the kept rows and the dev rows) cost what their shards took
    assert 0 < results["teacher_cache_s"] <= built + 0.01
    assert len(record["rows_cost_s"]) == len(json.loads((entry / "index.json").read_text()))


def test_a_second_run_with_another_seed_finds_every_row_stored(tmp_path, tiny_models, srd_data, teacher_store):  # noqa: F811
    """Another seed (another data order) and another method on the same rows and teacher build
    nothing: a row is found by its tokens. Its time still counts what its rows cost to build."""
    first = _args("train", tiny_models, srd_data, tmp_path / "a", "loss.teacher_top_k=8", "train.epochs=1")
    assert main(first) == 0
    entry = _entry(teacher_store)
    index_before = (entry / "index.json").read_text()
    second = _args("train", tiny_models, srd_data, tmp_path / "b", "loss.teacher_top_k=8", "seed=7", "loss.tau=2")
    assert main(second) == 0
    assert (entry / "index.json").read_text() == index_before  # nothing built: tau 2 was stored with the rows
    done = json.loads((tmp_path / "b" / "x" / "done.json").read_text())
    assert done["teacher_cache_s"] == 0.0
    record = json.loads((tmp_path / "b" / "x" / "teacher-store.json").read_text())
    assert record["built_s"] == 0.0 and sum(record["rows_cost_s"].values()) > 0
    # another k is another entry
    third = _args("train", tiny_models, srd_data, tmp_path / "c", "loss.teacher_top_k=4", "train.max_steps=1")
    assert main(third) == 0
    from srd.train.teacher_store import entries

    assert len(entries(teacher_store)) == 2


def test_training_from_the_store_never_runs_the_teacher(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """Neither training steps nor the dev loss: both read the store."""
    args = _args("train", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8", "train.epochs=2")
    import srd.train.loop as loop

    def no_teacher(*a, **k):
        raise AssertionError("the teacher ran during training despite the store")

    monkeypatch.setattr(loop, "teacher_features", no_teacher)
    assert main(args) == 0
    run = tmp_path / "x"
    done = json.loads((run / "done.json").read_text())
    assert done["teacher_cache_s"] > 0 and done["steps"] == 20  # 2 epochs x 10 batches of 2
    rows = [json.loads(x) for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert all(r["kd"] > 0 for r in rows)
    dev = [json.loads(x) for x in (run / "logs" / "eval.jsonl").read_text().splitlines()]
    assert dev and all(r["dev_kd"] > 0 for r in dev)


def _rows(tokenizer, n=10, seed=0):
    from srd.data.tokenize import Encoded

    g = torch.Generator().manual_seed(seed)
    enc = []
    for i in range(n):
        n_prompt, n_resp = 3 + i % 4, 2 + i % 5
        toks = torch.randint(5, len(tokenizer), (n_prompt + n_resp,), generator=g).tolist()
        enc.append(Encoded(id=f"e{i}", input_ids=toks, labels=[-100] * n_prompt + toks[n_prompt:]))
    return enc


def _teacher(tiny_models):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_models["llama-teacher"]).eval()


META = {"teacher": "tiny", "top_k": 4, "vocab": 0}


def _meta(tokenizer):
    return {**META, "vocab": len(tokenizer)}


def test_stored_rows_equal_the_teachers_buckets_to_float16_precision(tmp_path, tiny_models, tokenizer):
    """What the store serves is the teacher's own buckets (ids exact, logits shifted by the
    position's largest one, to float16 precision), in the order asked, at each temperature."""
    from srd.data.tokenize import collate, pad_id
    from srd.models.features import target_features
    from srd.train.teacher_store import TeacherStore, feature_buckets

    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    store = TeacherStore(tmp_path, _meta(tokenizer))
    assert store.build(teacher, tokenizer, enc, (1.0, 2.0)).rows == 10
    for e in reversed(enc):
        batch = collate([e], pad_id(tokenizer))
        feats, _, _, head = target_features(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
        with torch.no_grad():
            ids, buckets = feature_buckets(feats, head, len(tokenizer), 4, (1.0, 2.0))
        for j, tau in enumerate((1.0, 2.0)):
            got = store.rows([e], "cpu", tau)
            want = torch.cat([buckets[:, :4], buckets[:, 4 + j : 5 + j]], 1)
            assert torch.equal(got.ids, ids)
            assert torch.allclose(got.buckets, want - want[:, :1], atol=2e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="not 1.5"):
        store.rows(enc[:1], "cpu", 1.5)


def test_another_temperature_rebuilds_only_those_rows_and_keeps_serving_the_old(tmp_path, tiny_models, tokenizer):
    from srd.train.teacher_store import TeacherStore

    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    store = TeacherStore(tmp_path, _meta(tokenizer))
    store.build(teacher, tokenizer, enc[:6], (1.0,))
    assert store.missing(enc, (1.0,)) == enc[6:]
    assert store.missing(enc, (3.0,)) == enc
    assert store.build(teacher, tokenizer, enc[:8], (3.0,)).rows == 8
    assert store.missing(enc, (1.0, 3.0)) == enc[8:]  # rebuilt for the old temperature too
    assert store.shard_taus(1) == [1.0, 3.0]
    assert store.rows(enc[:8], "cpu", 1.0).ids.shape[0] == sum(e.n_loss_targets for e in enc[:8])


def test_an_interrupted_build_keeps_its_finished_shards(tmp_path, tiny_models, tokenizer, monkeypatch):
    """Shards are written as they fill; a build that dies keeps them (and their time), the next
    computes only the rest, and the rows are the same as one uninterrupted build's."""
    import srd.train.teacher_store as step  # where the build looks the function up
    from srd.train.teacher_store import TeacherStore

    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    whole = TeacherStore(tmp_path / "whole", _meta(tokenizer))
    assert whole.build(teacher, tokenizer, enc, (1.0,)).rows == 10
    assert len(whole.shards) == 1

    real, calls, seconds = step.target_features, {"n": 0}, []

    def dies_on_the_fourth_row(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(step, "target_features", dies_on_the_fourth_row)
    parts = TeacherStore(tmp_path / "parts", _meta(tokenizer))
    with pytest.raises(KeyboardInterrupt):
        parts.build(teacher, tokenizer, enc, (1.0,), shard_positions=1, on_shard=seconds.append)
    assert len(seconds) == 3 and all(s > 0 for s in seconds)  # the three rows before the failure
    (parts.folder / ".shard-00003.ids.srd-tmp.npy").write_bytes(b"half")  # what a kill leaves
    monkeypatch.setattr(step, "target_features", real)
    parts = TeacherStore(tmp_path / "parts", _meta(tokenizer))  # a new process
    longest_first = sorted(enc, key=lambda e: -len(e.input_ids))
    assert parts.missing(enc, (1.0,)) == [e for e in enc if e in longest_first[3:]]
    assert parts.build(teacher, tokenizer, enc, (1.0,), shard_positions=1).rows == 7
    assert not list(parts.folder.glob(".*srd-tmp*")) and len(parts.shards) == 10
    a, b = whole.rows(enc, "cpu"), parts.rows(enc, "cpu")
    assert torch.equal(a.ids, b.ids) and torch.equal(a.buckets, b.buckets)  # each row computed alone either way


def test_two_builders_never_compute_a_row_twice(tmp_path, tiny_models, tokenizer):
    """Two runs building the same entry at once: the second waits for the lock, then finds the
    rows the first built (processes, as two runs are)."""
    import multiprocessing as mp

    from srd.train.teacher_store import TeacherStore

    ctx = mp.get_context("spawn")
    with ctx.Pool(2) as pool:
        built = pool.starmap(_build_in_a_process, [(str(tmp_path), tiny_models["llama-teacher"], i) for i in range(2)])
    assert sorted(built) == [0, 10]
    store = TeacherStore(tmp_path, _meta(tokenizer))
    assert len(store.shards) == 1 and len(store.index) == 10


def test_a_new_entry_writes_its_meta_under_the_lock_a_build_holds(tmp_path, tokenizer):
    """A build holding an entry's lock removes the temporaries it finds in the entry's folder (a
    killed build's); a second run opening the same new entry at that moment must not have its
    meta.json half-written there, so it waits for the lock before writing it."""
    import threading

    from srd.train.teacher_store import TeacherStore, _locked, entry_name
    from srd.utils import mark_srd_folder

    mark_srd_folder(tmp_path, "teacher-store")
    folder = tmp_path / entry_name(_meta(tokenizer))
    folder.mkdir(parents=True)
    opened: list[TeacherStore] = []
    with _locked(folder / "lock"):
        t = threading.Thread(target=lambda: opened.append(TeacherStore(tmp_path, _meta(tokenizer))))
        t.start()
        t.join(0.5)
        assert t.is_alive() and not (folder / "meta.json").exists() and not opened
    t.join(30)
    assert opened and json.loads((folder / "meta.json").read_text()) == opened[0].meta


def _build_in_a_process(root: str, teacher_path: str, _: int) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from srd.train.teacher_store import TeacherStore

    tokenizer = AutoTokenizer.from_pretrained(teacher_path)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_path).eval()
    store = TeacherStore(Path(root), _meta(tokenizer))
    return store.build(teacher, tokenizer, _rows(tokenizer), (1.0,)).rows


def test_a_flipped_byte_is_found_and_set_aside_by_srd_store(tmp_path, tiny_models, tokenizer, capsys):
    """A copied store is checked by `srd store --verify`; a flipped byte names the file, and
    --set-aside moves its shard into damaged/ so that the next build computes its rows again."""
    from srd.train.checkpoint import CheckpointError
    from srd.train.teacher_store import TeacherStore

    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    store = TeacherStore(tmp_path, _meta(tokenizer))
    store.build(teacher, tokenizer, enc[:5], (1.0,))
    store.build(teacher, tokenizer, enc[5:], (1.0,))
    assert main(["store", "--store", str(tmp_path), "--verify"]) == 0
    out = capsys.readouterr().out
    assert "10 rows" in out and "every shard matches" in out and "bytes per position" in out
    shard = store.folder / "shard-00001.logits.npy"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=f"{shard} is damaged.*SHA-256.*--set-aside"):
        TeacherStore(tmp_path, _meta(tokenizer)).rows(enc[5:], "cpu")
    assert main(["store", "--store", str(tmp_path), "--verify"]) == 1
    assert f"damaged: {shard}" in capsys.readouterr().out
    assert main(["store", "--store", str(tmp_path), "--verify", "--set-aside"]) == 0
    assert (store.folder / "damaged" / shard.name).exists()
    again = TeacherStore(tmp_path, _meta(tokenizer))
    assert again.missing(enc, (1.0,)) == enc[5:]
    assert again.build(teacher, tokenizer, enc, (1.0,)).rows == 5
    assert "shard-00002.ids.npy" in again.shards["2"]["files"]  # a new number, not the set-aside one
    assert main(["store", "--store", str(tmp_path), "--verify"]) == 0


def test_a_store_folder_holding_someone_elses_files_is_refused(tmp_path, tiny_models, srd_data, capsys):  # noqa: F811
    mine = tmp_path / "documents"
    mine.mkdir()
    (mine / "thesis.tex").write_text("x")
    args = _args("train", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8", f"loss.teacher_store={mine}")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"srd train: error: teacher store {mine} already holds files srd did not write" in err
    assert "Loading weights" not in err  # found before any weights are read
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]
    # a file where the store should be: one line naming the setting to change, the file untouched
    args = _args(
        "train", tiny_models, srd_data, tmp_path, "loss.teacher_top_k=8", f"loss.teacher_store={mine / 'thesis.tex'}"
    )
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"teacher store {mine / 'thesis.tex'} is a file, not a folder" in err and "loss.teacher_store" in err
    assert "Loading weights" not in err and (mine / "thesis.tex").read_text() == "x"


def test_a_store_keeps_the_precision_its_teacher_ran_in(tiny_models, tokenizer):
    """Rows a bf16 teacher computed are not served where the teacher runs in float32 (`auto`
    resolving otherwise on another machine): a teacher whose weights are bf16 values has the same
    fingerprint in both dtypes, so the entry's key names a non-float32 dtype."""
    import copy

    from srd.config import load_config
    from srd.models.features import model_fingerprint
    from srd.train.loop import teacher_store_meta
    from srd.train.teacher_store import entry_name

    fp32 = _teacher(tiny_models)
    with torch.no_grad():
        for p in fp32.parameters():
            p.copy_(p.bfloat16().float())
    bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
    assert model_fingerprint(fp32) == model_fingerprint(bf16)
    cfg = load_config(None, ["loss.teacher_top_k=8"])
    a, b = (teacher_store_meta(cfg, m, tokenizer) for m in (fp32, bf16))
    assert "teacher_dtype" not in a and b["teacher_dtype"] == "bfloat16"
    assert {k: v for k, v in b.items() if k != "teacher_dtype"} == a and entry_name(a) != entry_name(b)


def test_a_k_the_vocabulary_cannot_hold_is_refused(tiny_models, tokenizer):
    """k must leave a rest bucket: top-k of all the logits (or more) failed deep inside torch.topk,
    after the teacher had loaded (TRL's use_teacher_store reaches entry_meta directly)."""
    from srd.train.teacher_store import entry_meta

    teacher = _teacher(tiny_models)
    assert entry_meta(teacher, len(tokenizer), len(tokenizer) - 1)["top_k"] == len(tokenizer) - 1
    for k in (0, len(tokenizer), 100_000):
        with pytest.raises(ValueError, match=f"top_k={k}: .* k must be between 1 and {len(tokenizer) - 1}"):
            entry_meta(teacher, len(tokenizer), k)


def test_a_row_key_changes_with_any_token_or_label():
    from srd.data.tokenize import Encoded
    from srd.train.teacher_store import row_key

    base = Encoded(id="a", input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4])
    assert row_key(base) == row_key(Encoded(id="other id", input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4]))
    for other in (
        Encoded(id="a", input_ids=[1, 2, 3, 5], labels=[-100, -100, 3, 5]),
        Encoded(id="a", input_ids=[1, 2, 3, 4], labels=[-100, 2, 3, 4]),  # another prompt/response split
        Encoded(id="a", input_ids=[1, 2, 3, 4], labels=[-100, -100, 3, 4], seq2seq=True),
    ):
        assert row_key(other) != row_key(base)


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


def test_a_run_whose_rows_are_all_stored_never_loads_the_teacher(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """The second run of the same settings finds every row (training and dev) in the store under
    the teacher's files: the teacher's weights are never read, and the run trains to the same
    weights, bit for bit, as the run that loaded the teacher and built the rows."""
    import srd.recipes.train as recipes

    first = _args("train", tiny_models, srd_data, tmp_path / "a", "loss.teacher_top_k=8", "train.epochs=1")
    assert main(first) == 0
    real, loaded = recipes.load_model, []

    def watch(spec, **kw):
        loaded.append(spec)
        return real(spec, **kw)

    monkeypatch.setattr(recipes, "load_model", watch)
    second = _args("train", tiny_models, srd_data, tmp_path / "b", "loss.teacher_top_k=8", "train.epochs=1")
    assert main(second) == 0
    assert loaded == [str(tiny_models["llama-student"])]  # the student only
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "x" / "final" / "model.safetensors") for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la, lb = ((tmp_path / d / "x" / "logs" / "eval.jsonl").read_text() for d in ("a", "b"))
    assert [json.loads(x)["dev_kd"] for x in la.splitlines()] == [json.loads(x)["dev_kd"] for x in lb.splitlines()]
    # other rows (another prompt): the teacher is loaded and the rows built
    loaded.clear()
    third = _args("train", tiny_models, srd_data, tmp_path / "c", "loss.teacher_top_k=8", "train.max_steps=1")
    assert main([*third, "data.instruction_suffix=Be brief."]) == 0
    assert str(tiny_models["llama-teacher"]) in loaded


def test_an_srd_experiment_on_stored_rows_never_loads_the_teacher(
    tmp_path,
    tiny_models,
    srd_data,  # noqa: F811
    monkeypatch,
):
    """`srd run` with its KD baseline, a second seed: neither method loads the teacher."""
    import srd.recipes.train as recipes

    extra = ("loss.teacher_top_k=8", "compare.baseline=true", "eval.benchmarks=[]")
    assert main(_args("run", tiny_models, srd_data, tmp_path / "a", *extra)) == 0
    real, loaded = recipes.load_model, []
    monkeypatch.setattr(recipes, "load_model", lambda spec, **kw: (loaded.append(spec), real(spec, **kw))[1])
    assert main(_args("run", tiny_models, srd_data, tmp_path / "b", *extra, "seed=7")) == 0
    assert str(tiny_models["llama-teacher"]) not in loaded and loaded
    res = json.loads((tmp_path / "b" / "x" / "results.json").read_text())
    assert res["teacher_built_s"] == 0.0 and res["teacher_cache_s"] > 0


def test_srd_store_on_a_folder_that_is_not_a_store_says_so(tmp_path, capsys):
    """`srd store --store` on the cache folder above the store (or any other folder with files)
    said "0 entries", as if the store were empty; now it says what the folder is not, and
    where the store is when it lies just below."""
    from srd.utils import mark_srd_folder

    cache = tmp_path / "cache"
    mark_srd_folder(cache / "teacher-store", "teacher-store")
    (cache / "other.txt").write_text("x")
    assert main(["store", "--store", str(cache)]) == 2
    err = capsys.readouterr().err
    assert "is not a teacher store" in err and f"did you mean {cache / 'teacher-store'}?" in err
    assert main(["store", "--store", str(cache / "teacher-store")]) == 0
    assert "0 entries" in capsys.readouterr().out


def test_srd_store_names_who_used_an_entry_and_removes_it_only_when_no_run_holds_it(
    tmp_path, tiny_models, tokenizer, capsys
):
    """`srd store` lists the teachers (as runs named them) that used each entry, and when;
    `--remove` frees an entry, but not while a run holds it open (reading or building it), and
    never a name that is not one of the store's entries. A run that opens the entry while it is
    being removed waits, then starts a new one."""
    import os
    import threading

    from srd.train.teacher_store import USERS, TeacherStore, remove_entry

    root = tmp_path / "store"
    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    store = TeacherStore(root, _meta(tokenizer))
    store.build(teacher, tokenizer, enc, (1.0,))
    store.note_use("my-teacher")
    name = store.folder.name
    (root / "sources.json").write_text(json.dumps({"files-key": name, "other-key": "elsewhere"}))
    capsys.readouterr()
    assert main(["store", "--store", str(root)]) == 0
    assert f"{name}: teacher tiny" in (out := capsys.readouterr().out) and "used with my-teacher (last 20" in out
    # held by a run (this object): refused, named, left whole
    assert main(["store", "--store", str(root), "--remove", name]) == 2
    err = capsys.readouterr().err
    assert f"teacher store entry {root / name} is in use by a run (pid {os.getpid()})" in err
    assert TeacherStore(root, _meta(tokenizer)).missing(enc, (1.0,)) == []
    for bad, said in (("nope", f"has no entry nope (its entries: {name})"), ("../store", "is not an entry name")):
        assert main(["store", "--store", str(root), "--remove", bad]) == 2 and said in capsys.readouterr().err
    store.close()
    assert main(["store", "--store", str(root), "--remove", name]) == 0
    assert f"removed teacher store entry {root / name} (" in capsys.readouterr().out
    assert not (root / name).exists() and json.loads((root / "sources.json").read_text()) == {"other-key": "elsewhere"}
    assert [p.name for p in root.iterdir() if p.name.startswith(".removed-")] == []
    # a run opening the entry while a removal holds it waits, then makes the entry again
    import fcntl

    TeacherStore(root, _meta(tokenizer)).close()
    users = open(root / name / USERS, "a+")  # noqa: SIM115 - what remove_entry holds
    fcntl.flock(users, fcntl.LOCK_EX)
    opened = []
    waiter = threading.Thread(target=lambda: opened.append(TeacherStore(root, _meta(tokenizer))))
    waiter.start()
    waiter.join(0.5)
    assert waiter.is_alive()  # waiting for the removal
    (root / name).rename(root / f".removed-{name}.srd-tmp")
    users.close()
    waiter.join(10)
    assert opened and (root / name / "meta.json").is_file() and opened[0].missing(enc, (1.0,)) == enc
    opened[0].close()
    assert remove_entry(root, name) > 0  # the leftover of the interrupted removal is cleared too
    assert sorted(p.name for p in root.iterdir()) == [".srd-folder.json", "lock", "sources.json"]
    # a folder that is not a store srd made: nothing removed
    mine = tmp_path / "mine"
    (mine / "abc").mkdir(parents=True)
    (mine / "abc" / "meta.json").write_text("{}")
    assert main(["store", "--store", str(mine), "--remove", "abc"]) == 2
    assert "is not a teacher store" in capsys.readouterr().err and (mine / "abc" / "meta.json").exists()


def test_a_stored_row_is_the_same_whichever_rows_were_built_beside_it(tmp_path, wide_models, tokenizer, monkeypatch):
    """Two runs that build different sets of rows (a KD baseline on all rows, SRD on the kept
    ones, in another order) store the same values for the rows they share, to the bit, in bf16:
    every row goes through the teacher alone. Batched, a bf16 row's logits depend on the rows
    padded beside it, and a run's numbers then depend on which run filled the store first."""
    from transformers import AutoModelForCausalLM

    import srd.train.teacher_store as step
    from srd.train.teacher_store import TeacherStore

    teacher = AutoModelForCausalLM.from_pretrained(wide_models["llama-teacher"], dtype=torch.bfloat16).eval()
    enc = _rows(tokenizer, n=12, seed=3)
    real, rows_seen = step.target_features, []

    def counting(model, input_ids, *a, **k):
        rows_seen.append(input_ids.shape[0])
        return real(model, input_ids, *a, **k)

    monkeypatch.setattr(step, "target_features", counting)
    meta = {**_meta(tokenizer), "teacher_dtype": "bfloat16"}
    everything = TeacherStore(tmp_path / "a", meta)
    assert everything.build(teacher, tokenizer, enc, (1.0, 2.0)).rows == 12
    assert rows_seen == [1] * 12
    kept = list(reversed(enc[::3]))
    some = TeacherStore(tmp_path / "b", meta)
    assert some.build(teacher, tokenizer, kept, (1.0, 2.0)).rows == 4
    for tau in (1.0, 2.0):
        a, b = everything.rows(kept, "cpu", tau), some.rows(kept, "cpu", tau)
        assert torch.equal(a.ids, b.ids) and torch.equal(a.buckets, b.buckets)
    with pytest.raises(ValueError, match="at least 1 row"):
        some.build(teacher, tokenizer, enc, (1.0,), rows_per_forward=0)


def test_an_entry_an_older_srd_wrote_is_never_read_and_is_listed_for_removal(tmp_path, tiny_models, tokenizer, capsys):
    """Store format 2 computed rows in padded batches and rounded a bf16 teacher's rotary
    frequencies: its entries are not read (a run computes its rows into a new entry, and the
    teacher files that pointed there are not served from it); `srd store` lists them with the
    command that frees their disk, and that command removes them."""
    import srd.train.teacher_store as ts
    from srd.train.teacher_store import TeacherStore, find_source, record_source

    root = tmp_path / "store"
    teacher, enc = _teacher(tiny_models), _rows(tokenizer)
    old_format = ts.FORMAT
    ts.FORMAT = 2
    try:
        old = TeacherStore(root, _meta(tokenizer))
        old.build(teacher, tokenizer, enc[:4], (1.0,))
        old.close()
    finally:
        ts.FORMAT = old_format
    record_source(root, "files-key", old.folder.name)
    assert find_source(root, "files-key") is None  # the teacher is loaded instead
    new = TeacherStore(root, _meta(tokenizer))
    assert new.folder != old.folder and new.missing(enc, (1.0,)) == enc
    assert new.build(teacher, tokenizer, enc, (1.0,)).rows == 10
    new.close()
    capsys.readouterr()
    assert main(["store", "--store", str(root)]) == 0
    out = capsys.readouterr().out
    assert "2 entries" in out and f"{new.folder.name}: teacher tiny" in out
    assert (
        f"{old.folder.name}: written by an older srd, not read by this one; `srd store --remove {old.folder.name}`"
        in out
    )
    assert main(["store", "--store", str(root), "--remove", old.folder.name]) == 0
    assert not old.folder.exists() and new.folder.exists()
