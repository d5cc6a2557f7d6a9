"""Small shared helpers: atomic file writes, seeding, fingerprints, JSONL logs."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import random
import shutil
import sys
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

# Every temporary srd writes carries one of these tags (`.<name>.<random>.srd-tmp` files,
# `.<name>.srd-tmp` folders, `.<name>.srd-old` folders of replace_dir), and every folder srd
# creates for a run or a student holds MARKER: so a restart removes only what srd can prove it
# wrote (remove_stale_temporaries), and a user's `notes.old/` or `.draft.tmp` is never touched.
TMP_TAG = ".srd-tmp"
OLD_TAG = ".srd-old"
MARKER = ".srd-folder.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def follow_umask(path: Path) -> None:
    """Give a folder made by tempfile.mkdtemp (0700) the mode any new folder gets (0755 under the
    usual umask), so that a team can read what srd wrote."""
    os.chmod(path, 0o777 & ~_UMASK)


class FolderError(ValueError):
    """A folder srd would write into holds files srd did not write; the message says the ways on."""


def tmp_sibling(path: Path) -> Path:
    """Where srd builds `path` before moving it into place: `.<name>.srd-tmp` beside it."""
    return path.with_name(f".{path.name}{TMP_TAG}")


def is_srd_temporary(path: Path) -> bool:
    """A name only srd's temporaries have (hidden, carrying TMP_TAG or ending in OLD_TAG)."""
    return path.name.startswith(".") and (TMP_TAG in path.name or path.name.endswith(OLD_TAG))


def mark_srd_folder(path: Path, kind: str) -> None:
    """Create `path` if needed and record that srd owns it (`kind`: run, student, ...)."""
    path.mkdir(parents=True, exist_ok=True)
    if not (path / MARKER).exists():
        atomic_write_json(path / MARKER, {"written_by": "srd", "kind": kind})


# Folders this process works in (their marker's open file, locked), held until the outermost
# `folder_locks()` block ends: `srd run` and a second `srd run` of the same run at the same time
# would mix their checkpoints and logs.
_HELD: dict[str, Any] = {}
_DEPTH = [0]


def lock_folder(path: Path, what: str = "folder") -> None:
    """Lock srd's marker in `path` (exclusive, not waiting) for this process; FolderError naming
    the process that holds it otherwise. Re-entrant within the process; a no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return
    key = str(Path(path).resolve())
    if key in _HELD:
        return
    try:
        f = open(Path(path) / MARKER, "rb")  # noqa: SIM115 - held open while the lock is
    except OSError:  # no marker to lock (a folder srd has not marked): nothing to hold
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
            f.close()
            return  # a file system without locks (some network mounts): work on unlocked, as before
        holder = lock_holder(os.fstat(f.fileno()).st_ino)
        f.close()
        raise FolderError(
            f"{what} {path} is in use by another srd process{f' (pid {holder})' if holder else ''}: wait for it to "
            "finish, or stop it and rerun this command to resume (two processes writing one folder would mix their "
            "files)"
        ) from None
    _HELD[key] = f


def lock_holder(inode: int) -> int | None:
    """The process holding a flock on the file with this inode (Linux's /proc/locks), if known."""
    try:
        for line in Path("/proc/locks").read_text().splitlines():
            parts = line.split()
            if len(parts) > 5 and parts[1] == "FLOCK" and parts[5].rsplit(":", 1)[-1] == str(inode):
                return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


class folder_locks(contextlib.ContextDecorator):  # noqa: N801 - a context manager / decorator, like contextlib's
    """The span of one srd command (`srd run`, `srd train`, ...): the folder locks taken inside
    it are released when the outermost such block ends. Nested blocks (run_experiment calling
    run_pipeline) keep them until then."""

    def __enter__(self) -> None:
        _DEPTH[0] += 1

    def __exit__(self, *exc: Any) -> None:
        _DEPTH[0] -= 1
        if _DEPTH[0] == 0:
            for f in _HELD.values():
                f.close()  # closing the file releases its lock
            _HELD.clear()


def srd_folder_kind(path: Path) -> str | None:
    """The kind srd recorded when it marked `path` (run, student, ...); None when srd did not mark it."""
    marker = path / MARKER
    if not marker.is_file():
        return None
    try:
        record = json.loads(marker.read_text())
        return str(record.get("kind", "")) if record.get("written_by") == "srd" else None
    except (ValueError, OSError, AttributeError):
        return None


def is_srd_folder(path: Path) -> bool:
    return srd_folder_kind(path) is not None


def claim_folder(
    path: Path,
    kind: str,
    *,
    overwrite: bool = False,
    legacy: bool = False,
    how: str | None = "overwrite=true",
    replaces: bool = False,
    create: bool = True,
    label: str = "",
    choose: str = "choose another folder",
) -> None:
    """Make `path` srd's before writing into it: a missing or empty folder, or one srd marked as
    this `kind` (or, with `legacy`, one an older srd wrote before markers existed) is marked and
    used; any other non-empty folder, and one srd marked as another kind (a run's folder named as
    a student's), is refused unless `overwrite` (then marked as this kind). `how` names the switch
    in the message, None when there is none; `replaces`: the caller then replaces the whole
    folder, and the message says so; `create=False`: only check, and let the caller mark the
    folder once its other checks passed. srd's own temporaries (another process marking the same
    new folder at this moment) do not make a folder someone else's. `label` names the folder's
    role in messages ("teacher store"), `choose` the way out in the refusals ("choose a new or
    empty folder (loss.teacher_store)")."""
    path = Path(path)
    name = f"{label} {path}" if label else str(path)
    if path.exists() and not path.is_dir():
        raise FolderError(f"{name} is a file, not a folder: {choose}")
    found = srd_folder_kind(path) if path.is_dir() else None
    if found and found != kind and not overwrite:  # e.g. a run's folder named as a student's or a store
        switch = f", or pass {how} {'to replace it' if replaces else 'to use it anyway'}" if how else ""
        article = "an" if kind[:1] in "aeiou" else "a"
        raise FolderError(f"{name} is srd's {found} folder, not {article} {kind} folder: {choose}{switch}")
    foreign = (
        path.is_dir()
        and any(not is_srd_temporary(p) for p in path.iterdir())
        and not is_srd_folder(path)
        and not legacy
    )
    if foreign and not overwrite:
        what = (
            "to replace it and everything in it"
            if replaces
            else "to write into it anyway (srd's files replace those of the same name; nothing else there is deleted)"
        )
        switch = f", or pass {how} {what}" if how else ""
        raise FolderError(f"{name} already holds files srd did not write; {choose}{switch}")
    try:
        if not create:
            check_writable(path)
            return
        if found and found != kind:  # overwrite: the folder is now this kind's
            atomic_write_json(path / MARKER, {"written_by": "srd", "kind": kind})
        mark_srd_folder(path, kind)
    except OSError as e:
        raise FolderError(f"{name} cannot be written ({e.strerror}): choose a folder you can write to") from None


def check_writable(path: str | os.PathLike) -> None:
    """FolderError unless `path` can be made and written (tried: permissions alone do not tell,
    e.g. for root, or under /proc); leaves the disk as it found it. A folder that exists is tried
    with a file of its own; a missing one, by making a folder of its own in its nearest existing
    parent and writing a file there. So it never makes or removes `path` itself, and the ranks of
    one run may check the same path at the same moment."""
    path = Path(path)
    existing = next(p for p in [path, *path.parents] if p.exists())
    try:
        if existing == path:
            fd, probe = tempfile.mkstemp(dir=path, prefix=".probe.", suffix=TMP_TAG)
            os.close(fd)
            os.unlink(probe)
            return
        folder = Path(tempfile.mkdtemp(dir=existing, prefix=".probe.", suffix=TMP_TAG))
        try:
            (folder / "probe").write_bytes(b"")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    except OSError as e:
        raise FolderError(f"{path} cannot be written ({e.strerror}): choose a folder you can write to") from None


def read_user_text(path: str | os.PathLike, error: type[Exception], what: str) -> str:
    """The text of a file the user named, or `error` with one line saying why not (missing, a
    folder, unreadable, not UTF-8) and which file: never a traceback from open()."""
    path = Path(path)
    if not path.exists():
        raise error(f"{what} {path} does not exist")
    if path.is_dir():
        raise error(f"{what} {path} is a folder, not a file: name the file inside it")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{what} {path} cannot be read ({e.strerror})") from None
    try:
        return data.decode("utf-8-sig")  # a leading byte-order mark (Windows editors write one) is dropped
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise error(
            f"{what} {path}, line {line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save it as UTF-8"
        ) from None


class DamagedFileError(ValueError):
    """A record srd wrote (JSON, YAML) no longer parses; the message names it and the way on,
    `why` says only what is wrong (for callers that know a better way on)."""

    def __init__(self, message: str, why: str) -> None:
        super().__init__(message)
        self.why = why


def read_json(path: str | os.PathLike) -> Any:
    """A JSON record srd wrote, or DamagedFileError naming it (cut short, garbled, not UTF-8)."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        why = str(e).splitlines()[0][:120]
        raise DamagedFileError(
            f"{path} is damaged ({why}); it is a record srd wrote: delete it and rerun the same command to rebuild "
            "what it records, or delete the folder that holds it to start that part over",
            why,
        ) from None


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def file_digests(folder: Path, skip: tuple[str, ...] = ("state.json",)) -> dict[str, dict[str, Any]]:
    """{relative path: {"size", "sha256"}} of every file under `folder` but those named in `skip`."""
    return {
        str(f.relative_to(folder)): {"size": f.stat().st_size, "sha256": sha256_file(f)}
        for f in sorted(folder.rglob("*"))
        if f.is_file() and f.name not in skip
    }


def digest_mismatch(folder: Path, recorded: dict[str, dict[str, Any]]) -> str | None:
    """The first recorded file of `folder` that is missing or differs from its record (size, then
    SHA-256), as `name (why)`; None when all match."""
    for name, want in sorted(recorded.items()):
        f = folder / name
        if not f.is_file():
            return f"{name} (missing)"
        if f.stat().st_size != want["size"]:
            return f"{name} ({f.stat().st_size} bytes, {want['size']} recorded)"
        if sha256_file(f) != want["sha256"]:
            return f"{name} (its SHA-256 differs from the one recorded)"
    return None


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half.

    The data goes to a temporary file in the same directory, is flushed to disk, then
    renamed over the target (rename is atomic on POSIX within one file system).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_TAG)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; srd's files follow the umask like any file
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def remove_stale_temporaries(root: Path) -> list[Path]:
    """Delete what a killed srd process can leave under `root`, which must be a folder srd marked
    (else nothing is touched): atomic writers' `.<name>.<random>.srd-tmp` files, half-written
    `.<name>.srd-tmp` folders, replace_dir's `.<name>.srd-old` folders and the teacher cache's
    unrenamed `.shard-*.srd-tmp.npy`. Call it only while no srd process writes there (a run's
    start); returns what was removed."""
    if not is_srd_folder(root):
        return []
    stale = [p for p in root.rglob("*") if is_srd_temporary(p)]
    removed = []
    for p in sorted(stale, key=lambda q: len(q.parts)):  # parents first; children go with them
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()
        removed.append(p)
    return removed


def replace_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Move a fully written directory into place, replacing any old one.

    A crash leaves either the old directory or the new one under `final_dir` (plus,
    at worst, a stale `.<name>.srd-old` directory that the next call removes).
    """
    old = final_dir.with_name(f".{final_dir.name}{OLD_TAG}")
    if old.exists():
        shutil.rmtree(old)
    if final_dir.exists():
        os.replace(final_dir, old)
    os.replace(tmp_dir, final_dir)
    if old.exists():
        shutil.rmtree(old)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def rng_state() -> dict[str, Any]:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap identity for a large file: name, size and the hash of its first and last MiB."""
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    h.update(f"{path.name}:{size}".encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > (2 << 20):
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def append_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> None:
    """Append rows to a JSONL log (one flushed line per row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        f.flush()


def drop_torn_tail(path: str | os.PathLike) -> None:
    """Cut a partial last line of an appended JSONL file (a kill mid-write), so that the rows
    appended next start on a line of their own."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return
    data = path.read_bytes()
    if not data.endswith(b"\n"):
        with open(path, "r+b") as f:
            f.truncate(data.rfind(b"\n") + 1)


def read_jsonl(path: str | os.PathLike, *, missing_ok: bool = False, cut_ok: bool = False) -> list[dict[str, Any]]:
    """Rows of a JSONL record srd wrote (blank lines skipped); [] for a missing file when
    `missing_ok`. A row that does not parse is DamagedFileError naming the file and line, except
    with `cut_ok` a last row cut short (a log appended to when its process was killed)."""
    if missing_ok and not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        lines = [(i, line) for i, line in enumerate(f, 1) if line.strip()]
    rows = []
    for n, (i, line) in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except ValueError:
            if cut_ok and n == len(lines) - 1:
                break
            raise DamagedFileError(
                f"{path}, line {i}: not a JSON row; it is a record srd wrote: delete it and rerun the same "
                "command to rebuild what it records, or delete the folder that holds it to start that part over",
                "not a JSON row",
            ) from None
    return rows


def cache_dir() -> Path:
    """Where converted models and other reusable artefacts go: $SRD_CACHE_DIR or ~/.cache/srd."""
    env = os.environ.get("SRD_CACHE_DIR")
    base = Path(env) if env else Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "srd"
    base.mkdir(parents=True, exist_ok=True)
    return base


def disk_full(exc: BaseException) -> bool:
    """Whether `exc` (or an exception it was raised from) is 'no space left on device'; some
    writers (safetensors) report it only in their message."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return True
        if "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_allocator_tuned: bool | None = None


def tune_cpu_allocator() -> bool:
    """Keep freed memory for reuse instead of handing every large tensor's pages back to the OS.

    glibc serves each allocation over 32 MB (every vocabulary-sized tensor of a KD step:
    1,024 x 49,152 float32 is 200 MB) with a fresh mmap and unmaps it when freed, so the next
    tensor of that size page-faults all of its pages again; on a CPU that costs about as much as
    the arithmetic on them (measured; benchmarks/README.md). This makes glibc
    serve them from its heap (M_MMAP_MAX = 0) and keep up to 2 GiB of freed heap (M_TRIM_THRESHOLD),
    as jemalloc or tcmalloc would. Only on Linux with glibc, once per process;
    `SRD_CPU_MALLOC=0` leaves the allocator as it is. Returns whether it is tuned."""
    global _allocator_tuned
    if _allocator_tuned is not None:
        return _allocator_tuned
    _allocator_tuned = False
    if os.environ.get("SRD_CPU_MALLOC", "1") == "0" or not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "gnu_get_libc_version"):  # glibc only (others have no such mallopt parameters)
            return False
    except OSError:
        return False
    _allocator_tuned = bool(libc.mallopt(_M_MMAP_MAX, 0)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    return _allocator_tuned


def cpu_allocator_tuned() -> bool:
    """Whether tune_cpu_allocator has tuned this process's allocator."""
    return bool(_allocator_tuned)
