"""The teacher store: the teacher's top-k logits at every target position of a training row,
computed once and reused by every run, seed and ablation that trains on the same row.

The teacher is frozen and KD trains many epochs over the same rows, so its forward pass can be
paid once. For each row the store keeps, per target position, the ids of the teacher's k
largest logits, those k logits, and for every temperature tau a run trains at (SRD's stages
raise it 1 -> 2) one logit r_tau standing for all other tokens, r_tau = tau * logsumexp over
the other tokens of z / tau, so that at temperature tau the bucket holds exactly their
probability mass. Divergences are then taken over k + 1 buckets (the student's probabilities
gathered at the same ids, the rest summed; srd.losses.kd.student_buckets_with_ce): both sides
are the exact distributions over those buckets at every stored temperature, so a bucketed
forward KL is a lower bound of the dense one (data processing).

What a row is stored under. An *entry* (one folder) per teacher: the fingerprint of its weights,
the precision it ran in, k and the vocabulary size. Inside, a row is found by its *row key*,
the SHA-256 of its token ids and labels: the data row, the prompt template, the lengths and the
tokenizer are all in it. So a run finds every row another run computed with the same teacher,
whatever its data order, subset, seed or method, and a row whose text or tokenisation changed
is simply another row.

Compression: ids as uint16 (int32 where the vocabulary exceeds 65,536); the logits as float16
after subtracting the position's largest logit (softmax at any temperature is unchanged by a
shift; the largest values, which carry the probability, are then near 0 where float16 is
finest): 2k + 2(k + T) bytes per target position, 262 for k = 64 and three temperatures.

Layout of an entry folder <store>/<entry>/:
  meta.json                 what the rows depend on (the entry's name is a hash of it)
  shards.json               per shard: temperatures, positions, build seconds, and the size and
                            SHA-256 of each file (checked before a shard is first read)
  index.json                row key -> [shard, first position, positions]; written last,
                            atomically, so a reader sees whole shards only
  shard-NNNNN.ids.npy       (n, k) top-k ids
  shard-NNNNN.logits.npy    (n, k + T) float16: the top-k logits, then one tail logit per
                            temperature of the shard, all minus the position's largest logit
  lock                      held while a build writes (two runs never write at once; the second
                            waits, then finds the rows the first built)
  users                     a shared lock every open entry holds (a run reading or building it):
                            `srd store --remove` removes an entry only while nobody holds it
  used.json                 the teachers (as runs named them) that used the entry, and when last
  damaged/                  shards set aside by `srd store --verify --set-aside`

A shard serves the temperatures it was built for. A run that needs another temperature for rows
already stored computes those rows again, for its temperatures and the entry's earlier ones, into
a new shard, and the index then points there. Files are written whole and renamed, and
nothing depends on the absolute path, so an entry can be copied to another machine as a folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from srd.data.tokenize import Encoded, collate, pad_id
from srd.losses.kd import SparseTeacher
from srd.models.features import model_fingerprint, target_features
from srd.models.load import precision_entry
from srd.train.checkpoint import CheckpointError
from srd.utils import (
    TMP_TAG,
    DamagedFileError,
    atomic_write_json,
    cache_dir,
    claim_folder,
    digest_mismatch,
    is_srd_temporary,
    read_json,
    sha256_file,
)

log = logging.getLogger(__name__)

# 1 was the per-run float32 cache (<run>/teacher-cache) before the store; 2 computed rows in padded
# batches (a bf16 row's values then depended on the rows beside it) and rounded a bf16 teacher's
# rotary frequencies; neither is read any more (`srd store` lists them for removal)
FORMAT = 3


def default_store() -> Path:
    """$SRD_TEACHER_STORE, else <srd cache folder>/teacher-store."""
    import os

    env = os.environ.get("SRD_TEACHER_STORE")
    return Path(env) if env else cache_dir() / "teacher-store"


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


def compress(ids: torch.Tensor, buckets: torch.Tensor, vocab: int) -> tuple[np.ndarray, np.ndarray]:
    """The stored form of sparse_buckets' output: narrow ids, float16 logits shifted so that each
    position's largest logit is 0 (clamped to float16's range)."""
    shifted = buckets - buckets[:, :1]  # topk sorts: column 0 is the position's largest logit
    id_type = np.uint16 if vocab <= 1 << 16 else np.int32
    return ids.cpu().numpy().astype(id_type), shifted.clamp_min(-65000.0).cpu().numpy().astype(np.float16)


def at_temperature(ids: torch.Tensor, buckets: torch.Tensor, taus: Sequence[float], tau: float) -> SparseTeacher:
    """The k + 1 buckets for temperature `tau` out of rows stored for `taus`."""
    j = _tau_index(taus, tau)
    k = ids.shape[-1]
    return SparseTeacher(ids, torch.cat([buckets[:, :k], buckets[:, k + j : k + j + 1]], dim=-1))


def _tau_index(taus: Sequence[float], tau: float) -> int:
    for j, t in enumerate(taus):
        if abs(t - tau) < 1e-9:
            return j
    raise ValueError(f"the stored rows hold temperatures {list(taus)}, not {tau}")


def row_key(e: Encoded) -> str:
    """The SHA-256 of a row's token ids and labels (and whether it is an encoder-decoder row)."""
    h = hashlib.sha256(b"s2s" if e.seq2seq else b"lm")
    h.update(np.asarray(e.input_ids, dtype=np.int64).tobytes())
    h.update(b"|")
    h.update(np.asarray(e.labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:32]


def entry_meta(teacher: Any, vocab: int, top_k: int) -> dict[str, Any]:
    """What an entry's rows depend on besides the rows themselves (whose key holds their tokens):
    the teacher's weights and the precision they ran in, k, the vocabulary size. A bf16 teacher
    whose weights are bf16 values has a float32 twin of the same fingerprint, so the precision is
    part of the key (float32 adds nothing)."""
    if not 0 < int(top_k) < int(vocab):
        raise ValueError(
            f"top_k={top_k}: the teacher store keeps the k largest of the {vocab} logits and one bucket for the "
            f"rest, so k must be between 1 and {int(vocab) - 1}"
        )
    return {
        **precision_entry("teacher_dtype", next(teacher.parameters()).dtype),
        "teacher": model_fingerprint(teacher),
        "top_k": int(top_k),
        "vocab": int(vocab),
    }


def entry_name(meta: dict[str, Any]) -> str:
    blob = json.dumps({**meta, "format": FORMAT}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


class OldEntryError(CheckpointError):
    """An entry folder of another store format: never read, removable with `srd store --remove`."""


@dataclass
class BuildResult:
    rows: int  # rows computed (0: the store held them all)
    seconds: float  # spent computing and writing them (waiting for another run's lock not included)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock on `path` (a file), held for the block; a no-op where fcntl is missing."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


USERS = "users"  # the file every open entry holds a shared lock on (see remove_entry)


def _hold_shared(folder: Path) -> Any:
    """A shared lock on `folder`'s users file, held while the returned file stays open; taken
    again on a new folder where the entry was removed while this waited. None without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    while True:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            f = open(folder / USERS, "a+")  # noqa: SIM115 - held open while the entry is in use
        except OSError:  # a store on a read-only file system: read it without holding it
            try:
                f = open(folder / USERS)  # noqa: SIM115
            except OSError:
                return None
        fcntl.flock(f, fcntl.LOCK_SH)
        try:
            if os.stat(folder / USERS).st_ino == os.fstat(f.fileno()).st_ino:
                return f
        except FileNotFoundError:  # removed (renamed away) while this waited: make it again
            pass
        f.close()


class TeacherStore:
    """One entry of a teacher store: rows of one teacher (fingerprint, precision), k and vocabulary."""

    def __init__(self, root: Path, meta: dict[str, Any]) -> None:
        self.root = Path(root)
        self.meta = {**meta, "format": FORMAT}
        self.folder = self.root / entry_name(meta)
        meta_path = self.folder / "meta.json"
        if not meta_path.exists():
            _claim_root(self.root)
        self._users = _hold_shared(self.folder)  # in use: not removed under this object
        if meta_path.exists():
            try:
                found = read_json(meta_path)
            except DamagedFileError as e:
                raise self._damaged(meta_path, e.why) from None
            if found != self.meta:
                raise CheckpointError(
                    f"teacher store entry {self.folder} holds rows for other settings ({meta_path} differs from "
                    f"what its name stands for); move it away and rerun: the rows are computed again"
                )
        else:
            # under the lock: a build holding it removes the temporaries it finds in the folder, and
            # the atomic writer's temporary for meta.json must not be one of them
            with _locked(self.folder / "lock"):
                if not meta_path.exists():
                    atomic_write_json(meta_path, self.meta)
        self._reload()

    def close(self) -> None:
        """Let go of the entry (it may be removed from then on); the object reads no more rows."""
        if self._users is not None:
            self._users.close()
            self._users = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def note_use(self, teacher: str | None) -> None:
        """Record in used.json that a run with the teacher `teacher` (as the run named it) used
        this entry now: what `srd store` lists, so that an entry is known by more than a hash."""
        if not teacher:
            return
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        # under its own lock, not the build's: a build may hold that one for minutes
        _update_json(self.folder / "used.json", self.folder / "used.lock", lambda used: {**used, str(teacher): now})

    def used(self) -> dict[str, str]:
        """Teacher name -> when a run last used this entry with it (used.json; empty if none)."""
        try:
            found = read_json(self.folder / "used.json") if (self.folder / "used.json").exists() else {}
        except DamagedFileError:
            return {}
        return {str(k): str(v) for k, v in found.items()} if isinstance(found, dict) else {}

    @classmethod
    def open(cls, folder: Path) -> TeacherStore:
        """An existing entry folder, for reading (srd store, a trainer without its teacher)."""
        folder = Path(folder)
        try:
            meta = read_json(folder / "meta.json")
        except (DamagedFileError, FileNotFoundError) as e:
            why = getattr(e, "why", "missing")
            raise CheckpointError(f"{folder} is not a teacher store entry ({folder / 'meta.json'}: {why})") from None
        if meta.get("format") != FORMAT:
            raise OldEntryError(
                f"{folder} holds teacher rows an older srd wrote (format {meta.get('format')}; this version reads "
                f"{FORMAT}): runs compute their rows again into a new entry; `srd store --remove {folder.name}` frees "
                "its disk"
            )
        meta = {k: v for k, v in meta.items() if k != "format"}
        store = cls(folder.parent, meta)
        if store.folder != folder:
            raise CheckpointError(f"{folder}'s meta.json does not match its name; it was edited or renamed")
        return store

    # -- reading -----------------------------------------------------------------------------------

    def _reload(self) -> None:
        self.index: dict[str, list[int]] = self._json("index.json")
        self.shards: dict[str, dict[str, Any]] = self._json("shards.json")
        self._arrays: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def _json(self, name: str) -> Any:
        path = self.folder / name
        try:
            return read_json(path) if path.exists() else {}
        except DamagedFileError as e:
            raise self._damaged(path, e.why) from None

    def shard_taus(self, shard: int) -> list[float]:
        return [float(t) for t in self.shards[str(shard)]["taus"]]

    def _serves(self, key: str, taus: Sequence[float]) -> bool:
        where = self.index.get(key)
        if where is None:
            return False
        have = self.shard_taus(where[0])
        return all(any(abs(t - h) < 1e-9 for h in have) for t in taus)

    def missing(self, encoded: Sequence[Encoded], taus: Sequence[float]) -> list[Encoded]:
        """The rows not stored, or stored without one of these temperatures."""
        return [e for e in encoded if not self._serves(row_key(e), taus)]

    def rows(self, encoded: Sequence[Encoded], device: Any, tau: float = 1.0) -> SparseTeacher:
        """The stored buckets of these rows at temperature `tau`, concatenated in this order (the
        loss's target order), as float32 logits and int64 ids on `device`."""
        id_parts, logit_parts = [], []
        for e in encoded:
            shard, start, n = self.index[row_key(e)]
            a, b = self._shard(shard)
            j = _tau_index(self.shard_taus(shard), tau)
            k = a.shape[1]
            id_parts.append(np.asarray(a[start : start + n]))
            logit_parts.append(np.concatenate([b[start : start + n, :k], b[start : start + n, k + j : k + j + 1]], 1))
        ids = torch.from_numpy(np.concatenate(id_parts).astype(np.int64)).to(device)
        return SparseTeacher(ids, torch.from_numpy(np.concatenate(logit_parts)).float().to(device))

    def row_costs(self, encoded: Sequence[Encoded]) -> dict[str, float]:
        """Row key -> what computing the row cost when it was built (its shard's seconds shared
        over the shard's positions), for the stored rows among these: a run's teacher time whether
        it built its rows or found them stored."""
        costs = {}
        for e in encoded:
            key = row_key(e)
            where = self.index.get(key)
            if where is not None:
                s = self.shards[str(where[0])]
                costs[key] = round(float(s["seconds"]) * where[2] / max(int(s["positions"]), 1), 4)
        return costs

    def _shard(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
        if shard not in self._arrays:
            record = self.shards[str(shard)]
            paths = [self.folder / name for name in record["files"]]
            for path in paths:  # a flipped byte is found before the rows are used
                bad = digest_mismatch(self.folder, {path.name: record["files"][path.name]})
                if bad:
                    raise self._damaged(path, bad.removeprefix(path.name).strip(" ()"))
            arrays = []
            for path in paths:
                try:
                    arrays.append(np.load(path, mmap_mode="r"))
                except (OSError, ValueError, EOFError) as e:  # cut short, or a garbled header
                    raise self._damaged(path, f"{type(e).__name__}: {e}") from e
            n = int(record["positions"])
            for path, a in zip(paths, arrays):
                if a.ndim != 2 or a.shape[0] != n:
                    raise self._damaged(path, f"shape {a.shape}, but shards.json records {n} positions")
            self._arrays[shard] = (arrays[0], arrays[1])
        return self._arrays[shard]

    def _damaged(self, path: Path, why: str) -> Exception:
        return CheckpointError(
            f"teacher store file {path} is damaged ({why}); run `srd store --store {self.root} --verify --set-aside` "
            f"to set its shard aside (its rows are computed again by the next run), or delete the folder {self.folder}"
        )

    # -- building ----------------------------------------------------------------------------------

    @torch.no_grad()
    def build(
        self,
        teacher: Any,
        tokenizer: Any,
        encoded: Sequence[Encoded],
        taus: Sequence[float],
        *,
        rows_per_forward: int = 1,
        chunk: int = 1024,
        shard_positions: int = 1 << 18,
        on_shard: Callable[[float], None] | None = None,
    ) -> BuildResult:
        """Compute and store every row of `encoded` the entry cannot serve at `taus`.

        Each row is computed alone (`rows_per_forward` 1), so what is stored for a row
        depends on the row and the teacher only, not on which rows a run happened to build beside
        it: in bf16 a padded batch changes a row's logits (benchmarks/teacher_store_rows.py), and
        then a run's numbers would depend on which run filled the store first. More rows per
        forward batch them longest first (for speed where that is measured to matter; such rows
        are not reproducible across runs that build different sets).

        Under the entry's lock: another run building the same entry finishes first, and its rows
        are then found here. A shard (and the index naming its rows) is written whenever
        `shard_positions` target positions have accumulated, so an interrupted build keeps what it
        finished and the next call computes only the rest. `on_shard(seconds)` is called after each
        shard is written, with the seconds it took (a run records its own share of the time)."""

        if rows_per_forward < 1:
            raise ValueError(f"rows_per_forward={rows_per_forward}: at least 1 row per forward pass")
        with _locked(self.folder / "lock"):
            self._reload()  # what other runs added while this one waited
            self._remove_stale_temporaries()  # a killed build's: nobody else writes while the lock is held
            unique = {row_key(e): e for e in self.missing(encoded, taus)}
            if not unique:
                return BuildResult(0, 0.0)
            earlier = {float(t) for s in self.shards.values() for t in s["taus"]}
            taus_all = tuple(sorted({round(float(t), 9) for t in (*taus, *earlier)}))
            # longest first (batched: each batch pads little); the index maps every row to its positions
            todo = sorted(unique.items(), key=lambda kv: -len(kv[1].input_ids))
            k, vocab = int(self.meta["top_k"]), int(self.meta["vocab"])
            device = next(teacher.parameters()).device
            pending: tuple[list[np.ndarray], list[np.ndarray], dict[str, list[int]]] = ([], [], {})
            positions, since, spent = 0, time.perf_counter(), 0.0
            for start in range(0, len(todo), rows_per_forward):
                part = todo[start : start + rows_per_forward]
                batch = {kk: v.to(device) for kk, v in collate([e for _, e in part], pad_id(tokenizer)).items()}
                feats, _, mask, head = target_features(
                    teacher, batch["input_ids"], batch["attention_mask"], batch["labels"]
                )
                ids, logits = compress(*feature_buckets(feats, head, vocab, k, taus_all, chunk), vocab)
                pending[0].append(ids)
                pending[1].append(logits)
                for (key, _), n in zip(part, mask.sum(1).tolist()):
                    pending[2][key] = [positions, int(n)]
                    positions += int(n)
                if positions >= shard_positions:
                    seconds = self._write_shard(*pending, taus_all, since)
                    spent, since = spent + seconds, time.perf_counter()
                    if on_shard is not None:
                        on_shard(seconds)
                    pending, positions = ([], [], {}), 0
            if pending[2]:
                seconds = self._write_shard(*pending, taus_all, since)
                spent += seconds
                if on_shard is not None:
                    on_shard(seconds)
            return BuildResult(len(todo), spent)

    def _write_shard(
        self,
        ids: list[np.ndarray],
        logits: list[np.ndarray],
        where: dict[str, list[int]],
        taus: tuple[float, ...],
        since: float,
    ) -> float:
        """Write one shard (its files, then shards.json, then the index that points into it: a
        reader never sees a row whose shard is not whole); returns the seconds since `since`."""
        on_disk = [*self.folder.glob("shard-*.npy"), *self.folder.glob("damaged/shard-*.npy")]
        used = [int(s) for s in self.shards] + [int(p.name[6:11]) for p in on_disk]
        shard = 1 + max(used, default=-1)  # never a number a set-aside or partly written shard had
        files = {}
        for name, parts in (("ids", ids), ("logits", logits)):
            final = self.folder / f"shard-{shard:05d}.{name}.npy"
            tmp = self.folder / f".{final.stem}{TMP_TAG}.npy"
            np.save(tmp, np.concatenate(parts))
            files[final.name] = {"size": tmp.stat().st_size, "sha256": sha256_file(tmp)}
            tmp.replace(final)
        seconds = time.perf_counter() - since
        n = sum(len(a) for a in ids)
        record = {"taus": list(taus), "positions": n, "rows": len(where), "seconds": round(seconds, 3), "files": files}
        atomic_write_json(self.folder / "shards.json", {**self.shards, str(shard): record})
        added = {key: [shard, row, n] for key, (row, n) in where.items()}
        atomic_write_json(self.folder / "index.json", {**self.index, **added})
        self._reload()
        return seconds

    def _remove_stale_temporaries(self) -> None:
        for p in self.folder.iterdir():
            if p.is_file() and is_srd_temporary(p):
                p.unlink()

    # -- upkeep (srd store) ------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """Rows, positions, bytes, bytes per position and build seconds of the rows the index names."""
        live = {int(s) for s, _, _ in self.index.values()}
        positions = sum(n for _, _, n in self.index.values())
        size = sum(f["size"] for s in live for f in self.shards[str(s)]["files"].values())
        on_disk = sum(p.stat().st_size for p in self.folder.glob("shard-*.npy"))
        return {
            "entry": self.folder.name,
            "teacher": self.meta.get("teacher"),
            "teacher_dtype": self.meta.get("teacher_dtype", "float32"),
            "top_k": self.meta.get("top_k"),
            "vocab": self.meta.get("vocab"),
            "taus": sorted({float(t) for s in live for t in self.shards[str(s)]["taus"]}),
            "rows": len(self.index),
            "positions": positions,
            "bytes": size,
            "bytes_on_disk": on_disk,
            "bytes_per_position": size / positions if positions else 0.0,
            "build_seconds": sum(float(s["seconds"]) for s in self.shards.values()),
        }

    def verify(self, *, set_aside: bool = False) -> list[str]:
        """Check every shard file against its record; `set_aside`: move the damaged shards into
        damaged/ and drop their rows from the index (the next run computes them again).
        Returns one line per damaged file."""
        with _locked(self.folder / "lock"):
            self._reload()
            bad: dict[str, list[str]] = {}
            for shard, record in sorted(self.shards.items(), key=lambda kv: int(kv[0])):
                for name, want in sorted(record["files"].items()):
                    why = digest_mismatch(self.folder, {name: want})
                    if why:
                        bad.setdefault(shard, []).append(f"{self.folder / name}: {why.removeprefix(name).strip(' ()')}")
            if set_aside and bad:
                aside = self.folder / "damaged"
                aside.mkdir(exist_ok=True)
                for shard in bad:
                    for name in self.shards[shard]["files"]:
                        if (self.folder / name).exists():
                            shutil.move(str(self.folder / name), str(aside / name))
                index = {k: v for k, v in self.index.items() if str(v[0]) not in bad}
                shards = {s: r for s, r in self.shards.items() if s not in bad}
                atomic_write_json(self.folder / "index.json", index)  # first: no row names a missing shard
                atomic_write_json(self.folder / "shards.json", shards)
                self._reload()
            return [line for lines in bad.values() for line in lines]


class StoredTeacher:
    """Stands in for the teacher model where the store holds every row a run trains and
    evaluates its dev loss on: the run then never loads the teacher's weights."""

    def __init__(self, store: TeacherStore) -> None:
        self.store = store

    def __repr__(self) -> str:
        return f"StoredTeacher({self.store.folder})"


def _update_json(path: Path, lock: Path, change: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    """Rewrite the JSON object at `path` as `change` makes it, under `lock` (written only if it
    changed). A lookup or listing aid only: a damaged one starts again from {}."""
    with _locked(lock):
        try:
            known = read_json(path) if path.exists() else {}
        except DamagedFileError:
            known = {}
        new = change(dict(known))
        if new != known:
            atomic_write_json(path, new)


def record_source(root: Path, source: str, entry: str) -> None:
    """Remember that the teacher files `source` (models.load.model_files_key) are the entry
    `entry`: a later run with the same files finds its rows without loading the teacher."""
    _update_json(Path(root) / "sources.json", Path(root) / "lock", lambda known: {**known, source: entry})


def find_source(root: Path, source: str) -> TeacherStore | None:
    """The entry recorded for the teacher files `source`, if any (and still there)."""
    path = Path(root) / "sources.json"
    try:
        entry = read_json(path).get(source) if path.exists() else None
    except DamagedFileError:
        return None
    if entry is None or not (Path(root) / entry / "meta.json").exists():
        return None
    try:
        return TeacherStore.open(Path(root) / entry)
    except OldEntryError:  # the teacher is loaded and its rows computed into this format's entry
        return None


def store_root(setting: str | None) -> Path:
    """The store's folder for loss.teacher_store (null: default_store())."""
    return Path(setting).expanduser() if setting else default_store()


def check_store_root(root: Path) -> None:
    """FolderError unless `root` can be a teacher store (before a run reads any weights)."""
    _claim_root(root, create=False)


def _claim_root(root: Path, create: bool = True) -> None:
    """Mark `root` as a teacher store: a new or empty folder, or one srd already marked
    (`create=False`: only check that it could be, leaving the disk as it is)."""
    claim_folder(
        root,
        "teacher-store",
        how=None,
        create=create,
        label="teacher store",
        choose="choose a new or empty folder (loss.teacher_store, or $SRD_TEACHER_STORE)",
    )


def entries(root: Path) -> list[Path]:
    """The entry folders of a store (each with a meta.json), by name."""
    root = Path(root)
    found = root.glob("*/meta.json") if root.is_dir() else []
    return sorted(p.parent for p in found if not is_srd_temporary(p.parent))  # not one being removed


def remove_entry(root: Path, name: str) -> int:
    """Remove the entry `name` of the store `root` (srd store --remove): only an entry of a store
    srd made, and only while no run holds it (reading or building its rows), else FolderError
    naming the process. The folder is renamed away first, so a run starting meanwhile makes a
    new one; the teacher files that pointed to it are forgotten (sources.json). Returns the
    bytes freed."""
    import fcntl

    from srd.utils import FolderError, lock_holder, srd_folder_kind

    root = Path(root)
    folder = root / name
    if srd_folder_kind(root) != "teacher-store":
        raise FolderError(f"{root} is not a teacher store (srd did not make it as one): nothing removed")
    if name in ("", ".", "..") or Path(name).name != name or is_srd_temporary(folder):
        raise FolderError(f"{name!r} is not an entry name: `srd store` lists the entries of {root}")
    if not (folder / "meta.json").is_file():
        known = ", ".join(p.name for p in entries(root)) or "none"
        raise FolderError(f"{root} has no entry {name} (its entries: {known})")
    for leftover in root.iterdir():  # what a removal killed midway left
        if leftover.is_dir() and is_srd_temporary(leftover) and leftover.name.startswith(".removed-"):
            shutil.rmtree(leftover, ignore_errors=True)
    gone = root / f".removed-{name}{TMP_TAG}"
    with open(folder / USERS, "a+") as users:
        try:
            fcntl.flock(users, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = lock_holder(os.fstat(users.fileno()).st_ino)
            raise FolderError(
                f"teacher store entry {folder} is in use by a run{f' (pid {holder})' if holder else ''}: remove it "
                "once that run has ended"
            ) from None
        folder.rename(gone)  # under the lock: a run opening the entry now waits, then makes a new folder
    size = sum(p.stat().st_size for p in gone.rglob("*") if p.is_file())
    shutil.rmtree(gone)
    _update_json(root / "sources.json", root / "lock", lambda known: {k: v for k, v in known.items() if v != name})
    return size
