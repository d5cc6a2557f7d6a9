"""A cached teacher: its top-k logits at every target position, computed once, memory-mapped.

The teacher is frozen and SRD trains many epochs over the same examples, so its forward
pass can be paid once. For each training example the cache keeps, per target position, the
ids of the teacher's k largest logits and k + 1 "bucket" logits: the k logits themselves and
one logit standing for every other token, chosen so that at tau = 1 the bucket holds exactly
the remaining probability mass (log of 1 - sum of the top-k probabilities, plus the log-partition).
Divergences are then taken over k + 1 buckets (the student's probabilities gathered at the
same ids, the rest summed; srd.losses.kd.sparse_student_buckets). At tau = 1 the teacher side
is exact; at another temperature the other tokens are treated as one token, an approximation
(`loss.teacher_top_k=0`, the default, keeps the dense teacher).

Layout of <run>/teacher-cache/: meta.json (teacher fingerprint, k, tokenisation), shards
`shard-NNNNN.ids.npy` (n, k) int32 and `shard-NNNNN.buckets.npy` (n, k + 1) float32, loaded
with mmap, and index.json (example id -> shard, first row, rows), written last and atomically.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srd.data.tokenize import Encoded, collate, pad_id
from srd.losses.kd import SparseTeacher
from srd.utils import atomic_write_json

log = logging.getLogger(__name__)


def sparse_buckets(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids of the k largest logits, k + 1 bucket logits): the top-k logits and one logit for
    all other tokens that carries exactly their probability mass at tau = 1."""
    lse = logits.logsumexp(-1, keepdim=True)
    top, ids = logits.topk(k, dim=-1)
    mass = (top - lse).exp().sum(-1, keepdim=True).clamp(max=1.0)
    rest = (lse + torch.log1p(-mass).clamp_min(-50.0)).clamp_min(top[:, -1:] - 50.0)
    return ids, torch.cat([top, rest], dim=-1)


class TeacherCache:
    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = meta
        meta_path = self.folder / "meta.json"
        if meta_path.exists() and json.loads(meta_path.read_text()) != meta:
            log.warning("teacher cache %s was made for another teacher or settings: rebuilding it", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, meta)
        self._load_index()

    def _load_index(self) -> None:
        path = self.folder / "index.json"
        self.index: dict[str, list[int]] = json.loads(path.read_text()) if path.exists() else {}
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def missing(self, ids: Sequence[str]) -> list[str]:
        return [i for i in ids if i not in self.index]

    @torch.no_grad()
    def build(
        self,
        teacher: Any,
        tokenizer: Any,
        encoded: Sequence[Encoded],
        *,
        batch_size: int,
        chunk: int = 1024,
        shard_rows: int = 1 << 18,
    ) -> int:
        """Compute and store the rows of every example in `encoded` not cached yet; returns how many.

        A shard (and the index naming its examples) is written whenever `shard_rows` target
        positions have accumulated, so an interrupted build keeps what it finished and the next
        call computes only the rest."""
        from srd.train.step import target_features

        todo = [e for e in encoded if e.id not in self.index]
        if not todo:
            return 0
        k = int(self.meta["top_k"])
        vocab = int(self.meta["vocab"])
        device = next(teacher.parameters()).device
        pending: tuple[list[np.ndarray], list[np.ndarray], dict[str, list[int]]] = ([], [], {})
        rows = 0
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            batch = {kk: v.to(device) for kk, v in collate(part, pad_id(tokenizer)).items()}
            feats, _, mask, head = target_features(
                teacher, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            for c in range(0, feats.shape[0], chunk):
                ids, buckets = sparse_buckets(head(feats[c : c + chunk]).float()[..., :vocab], k)
                pending[0].append(ids.to(torch.int32).cpu().numpy())
                pending[1].append(buckets.cpu().numpy())
            for e, n in zip(part, mask.sum(1).tolist()):
                pending[2][e.id] = [rows, int(n)]
                rows += int(n)
            if rows >= shard_rows:
                self._write_shard(*pending)
                pending, rows = ([], [], {}), 0
        if pending[2]:
            self._write_shard(*pending)
        return len(todo)

    def _write_shard(self, ids: list[np.ndarray], buckets: list[np.ndarray], where: dict[str, list[int]]) -> None:
        """Write one shard (arrays first, then the index that points into them: atomic)."""
        shard = 1 + max((v[0] for v in self.index.values()), default=-1)
        for name, parts in (("ids", ids), ("buckets", buckets)):
            tmp = self.folder / f".shard-{shard:05d}.{name}.npy"
            np.save(tmp, np.concatenate(parts))
            tmp.replace(self.folder / f"shard-{shard:05d}.{name}.npy")
        added = {i: [shard, row, n] for i, (row, n) in where.items()}
        atomic_write_json(self.folder / "index.json", {**self.index, **added})
        self._load_index()

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._shards:
            self._shards[shard] = (
                np.load(self.folder / f"shard-{shard:05d}.ids.npy", mmap_mode="r"),
                np.load(self.folder / f"shard-{shard:05d}.buckets.npy", mmap_mode="r"),
            )
        return self._shards[shard]

    def rows(self, ids: Sequence[str], device: Any) -> SparseTeacher:
        """The cached rows of these examples, concatenated in this order (the loss's target order)."""
        id_parts, bucket_parts = [], []
        for i in ids:
            shard, start, n = self.index[i]
            a, b = self._shard(shard)
            id_parts.append(np.asarray(a[start : start + n]))
            bucket_parts.append(np.asarray(b[start : start + n]))
        return SparseTeacher(
            torch.from_numpy(np.concatenate(id_parts)).long().to(device),
            torch.from_numpy(np.concatenate(bucket_parts)).float().to(device),
        )
