"""A cached teacher: its top-k logits at every target position, computed once, memory-mapped.

The teacher is frozen and SRD trains many epochs over the same examples, so its forward
pass can be paid once. For each training example the cache keeps, per target position, the
ids of the teacher's k largest logits, those k logits, and for every temperature tau the run
trains at (SRD's stages raise it 1 -> 2) one logit r_tau standing for all other tokens,
r_tau = tau * logsumexp over the other tokens of z / tau, so that at temperature tau the bucket
holds exactly their probability mass. Divergences are then taken over k + 1 buckets (the
student's probabilities gathered at the same ids, the rest summed; srd.losses.kd.
student_buckets_with_ce): both sides are the exact distributions over those buckets at every
cached temperature, so a bucketed forward KL is a lower bound of the dense one (data
processing). A temperature that was not cached cannot be served (the cache is rebuilt;
`loss.teacher_top_k=0`, the default, keeps the dense teacher).

Layout of <run>/teacher-cache/: meta.json (teacher fingerprint, k, temperatures, tokenisation),
digests.json (size and SHA-256 of every shard file, checked before a shard is used),
shards `shard-NNNNN.ids.npy` (n, k) int32 and `shard-NNNNN.buckets.npy` (n, k + T) float32 (the
top-k logits, then one tail logit per cached temperature), loaded with mmap, index.json
(example id -> shard, first row, rows), written last and atomically, and build.json (the seconds
spent computing the shards so far, over every invocation: what the cache cost a run, also when
its build was interrupted and resumed).
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srd.data.tokenize import Encoded, collate, pad_id
from srd.losses.kd import SparseTeacher
from srd.models.features import target_features
from srd.train.checkpoint import CheckpointError
from srd.utils import TMP_TAG, DamagedFileError, atomic_write_json, digest_mismatch, read_json, sha256_file

log = logging.getLogger(__name__)


def sparse_buckets(logits: torch.Tensor, k: int, taus: tuple[float, ...] = (1.0,)) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids of the k largest logits, k + len(taus) bucket logits): the top-k logits, then for each
    tau one logit r_tau for all other tokens, carrying exactly their probability mass at tau."""
    top, ids = logits.topk(k, dim=-1)
    rest = logits.scatter(-1, ids, float("-inf"))  # the other tokens (k < vocabulary: never empty)
    tails = [(rest / t).logsumexp(-1, keepdim=True) * t for t in taus]
    return ids, torch.cat([top, *tails], dim=-1)


def feature_buckets(
    feats: torch.Tensor, head: Any, vocab: int, k: int, taus: tuple[float, ...] = (1.0,), chunk: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """sparse_buckets of the logits head(feats) of N target positions, `chunk` positions at a
    time (never all N x V logits at once): (N, k) ids and (N, k + len(taus)) bucket logits."""
    parts = [
        sparse_buckets(head(feats[c : c + chunk]).float()[..., :vocab], k, taus) for c in range(0, len(feats), chunk)
    ]
    if not parts:
        return torch.empty(0, k, dtype=torch.long), torch.empty(0, k + len(taus))
    return torch.cat([i for i, _ in parts]), torch.cat([b for _, b in parts])


def at_temperature(ids: torch.Tensor, buckets: torch.Tensor, taus: Sequence[float], tau: float) -> SparseTeacher:
    """The k + 1 buckets for temperature `tau` out of rows cached for `taus`."""
    j = _tau_index(taus, tau)
    k = ids.shape[-1]
    return SparseTeacher(ids, torch.cat([buckets[:, :k], buckets[:, k + j : k + j + 1]], dim=-1))


def _tau_index(taus: Sequence[float], tau: float) -> int:
    for j, t in enumerate(taus):
        if abs(t - tau) < 1e-9:
            return j
    raise ValueError(f"the teacher cache holds temperatures {list(taus)}, not {tau}")


class TeacherCache:
    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        self.folder = Path(folder)
        self.meta = meta
        meta_path = self.folder / "meta.json"
        if meta_path.exists() and read_json(meta_path) != meta:
            log.warning("teacher cache %s was made for another teacher or settings: rebuilding it", self.folder)
            shutil.rmtree(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(meta_path, meta)
        self._load_index()

    def _load_index(self) -> None:
        path = self.folder / "index.json"
        try:
            self.index: dict[str, list[int]] = read_json(path) if path.exists() else {}
        except DamagedFileError as e:
            raise self._damaged(path, e.why) from None
        self._shards: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @staticmethod
    def build_seconds(folder: Path) -> float:
        """Seconds spent computing the shards in `folder` (0 where none are recorded)."""
        path = Path(folder) / "build.json"
        return float(read_json(path)["seconds"]) if path.exists() else 0.0

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

        # longest first, so each batch pads little (in input order, Dolly batches of 8 are about
        # half padding); the index maps every example to its rows, so the order is free
        todo = sorted((e for e in encoded if e.id not in self.index), key=lambda e: -len(e.input_ids))
        if not todo:
            return 0
        k = int(self.meta["top_k"])
        vocab = int(self.meta["vocab"])
        device = next(teacher.parameters()).device
        pending: tuple[list[np.ndarray], list[np.ndarray], dict[str, list[int]]] = ([], [], {})
        rows, since = 0, time.perf_counter()
        for start in range(0, len(todo), batch_size):
            part = todo[start : start + batch_size]
            batch = {kk: v.to(device) for kk, v in collate(part, pad_id(tokenizer)).items()}
            feats, _, mask, head = target_features(
                teacher, batch["input_ids"], batch["attention_mask"], batch["labels"]
            )
            ids, buckets = feature_buckets(feats, head, vocab, k, self.taus, chunk)
            pending[0].append(ids.to(torch.int32).cpu().numpy())
            pending[1].append(buckets.cpu().numpy())
            for e, n in zip(part, mask.sum(1).tolist()):
                pending[2][e.id] = [rows, int(n)]
                rows += int(n)
            if rows >= shard_rows:
                since = self._write_shard(*pending, since)
                pending, rows = ([], [], {}), 0
        if pending[2]:
            self._write_shard(*pending, since)
        return len(todo)

    def _write_shard(
        self, ids: list[np.ndarray], buckets: list[np.ndarray], where: dict[str, list[int]], since: float
    ) -> float:
        """Write one shard (arrays first, then the index that points into them: atomic) and add the
        time since `since` to build.json; returns the time it finished."""
        shard = 1 + max((v[0] for v in self.index.values()), default=-1)
        digests = self._digests()
        for name, parts in (("ids", ids), ("buckets", buckets)):
            tmp = self.folder / f".shard-{shard:05d}.{name}{TMP_TAG}.npy"
            np.save(tmp, np.concatenate(parts))
            final = self.folder / f"shard-{shard:05d}.{name}.npy"
            digests[final.name] = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)}
            tmp.replace(final)
        atomic_write_json(self.folder / "digests.json", digests)  # before the index names the shard
        added = {i: [shard, row, n] for i, (row, n) in where.items()}
        atomic_write_json(self.folder / "index.json", {**self.index, **added})
        self._load_index()
        now = time.perf_counter()
        atomic_write_json(self.folder / "build.json", {"seconds": self.build_seconds(self.folder) + now - since})
        return now

    def _digests(self) -> dict[str, dict[str, Any]]:
        """shard file name -> {"size", "sha256"} of every shard written (digests.json)."""
        path = self.folder / "digests.json"
        try:
            return read_json(path) if path.exists() else {}
        except DamagedFileError as e:
            raise self._damaged(path, e.why) from None

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._shards:
            paths = [self.folder / f"shard-{shard:05d}.{name}.npy" for name in ("ids", "buckets")]
            recorded = self._digests()
            for path in paths:  # a flipped byte is found before the rows are used
                if path.name in recorded:
                    bad = digest_mismatch(self.folder, {path.name: recorded[path.name]})
                    if bad:
                        raise self._damaged(path, bad.removeprefix(path.name).strip(" ()"))
            arrays = []
            for path in paths:
                try:
                    arrays.append(np.load(path, mmap_mode="r"))
                except (OSError, ValueError, EOFError) as e:  # missing, cut short, or a garbled header
                    raise self._damaged(path, f"{type(e).__name__}: {e}") from e
            rows = max((row + n for s, row, n in self.index.values() if s == shard), default=0)
            for path, a in zip(paths, arrays):
                if a.ndim != 2 or a.shape[0] < rows or a.shape[0] != arrays[0].shape[0]:
                    raise self._damaged(path, f"shape {a.shape}, but the index needs {rows} rows")
            self._shards[shard] = (arrays[0], arrays[1])
        return self._shards[shard]

    def _damaged(self, path: Path, why: str) -> Exception:

        return CheckpointError(
            f"teacher cache file {path} is damaged ({why}); delete the folder {self.folder} and rerun the same "
            f"command: the cache is rebuilt (it took {self.build_seconds(self.folder):.0f} s)"
        )

    @property
    def taus(self) -> tuple[float, ...]:
        return tuple(float(t) for t in self.meta.get("taus", [1.0]))

    def rows(self, ids: Sequence[str], device: Any, tau: float = 1.0) -> SparseTeacher:
        """The cached rows of these examples at temperature `tau`, concatenated in this order
        (the loss's target order)."""
        id_parts, bucket_parts = [], []
        for i in ids:
            shard, start, n = self.index[i]
            a, b = self._shard(shard)
            id_parts.append(np.asarray(a[start : start + n]))
            bucket_parts.append(np.asarray(b[start : start + n]))
        return at_temperature(
            torch.from_numpy(np.concatenate(id_parts)).long().to(device),
            torch.from_numpy(np.concatenate(bucket_parts)).float().to(device),
            self.taus,
            tau,
        )
