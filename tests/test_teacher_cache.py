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


def _buckets(t_logits: torch.Tensor, k: int) -> SparseTeacher:
    """What the cache stores for these teacher logits."""
    return SparseTeacher(*sparse_buckets(t_logits, k))


@pytest.mark.parametrize("divergence", sorted(DIVERGENCES))
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sparse_teacher_with_all_but_one_token_is_exact(divergence, tau):
    torch.manual_seed(0)
    v, n = 12, 7
    s = torch.randn(n, v, dtype=torch.float64)
    t = torch.randn(n, v, dtype=torch.float64) * 2
    y = torch.randint(0, v, (n,))
    dense = kd_loss_sums(s, t, y, divergence=divergence, tau=tau, chunk_size=3)
    sparse = kd_loss_sums(s, _buckets(t, v - 1), y, divergence=divergence, tau=tau, chunk_size=3)
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
