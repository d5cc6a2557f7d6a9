"""Shared by the benchmark scripts: the machine description and the markdown record they write."""

from __future__ import annotations

import contextlib
import datetime as dt
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


class Stopped(BaseException):
    """SIGTERM arrived (e.g. `timeout`'s limit in benchmarks/gpu.sh): stop measuring and record
    what is done. A BaseException, so that no `except Exception` on the way swallows it;
    subprocess.run kills its child on the way out."""


@contextlib.contextmanager
def sigterm_stops() -> Iterator[None]:
    """Inside: SIGTERM raises Stopped instead of ending the process, so a benchmark that runs
    over its time limit still writes the record of the implementations it finished."""

    def stop(signum: int, frame: Any) -> None:
        raise Stopped

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def machine() -> dict[str, Any]:
    """CPU / GPU, core count, library versions: what a recorded number depends on
    (srd.runtime.environment, in the keys and order records have always used, so a folder's
    machines.jsonl groups old and new lines alike)."""
    from srd.runtime import environment

    env = environment()
    keys = ("python", "torch", "transformers", "accelerate", "cpu_cores", "torch_threads", "cpu", "peft", "trl")
    keys += ("deepspeed", "cpu_isa", "cpu_native_bf16", "cpu_malloc", "gpu")
    return {k: env[k] for k in keys if k in env}


def command_line(argv: list[str], elide: tuple[str, ...] = ("--note",)) -> str:
    """The command as typed, with the values of `elide` options (long prose) shown as '...'."""
    out, skip = [], False
    for a in argv:
        out.append("'...'" if skip else a)
        skip = a in elide
    return " ".join(["python", *out])


MACHINES_LOG = "machines.jsonl"


_DELETE_OLD = ", or delete it yourself if it holds only this benchmark's runs from before srd marked them"


def claim_out(folder: Path, kind: str, *, legacy_ok: bool = True, own: tuple[str, ...] = ()) -> None:
    """Make a benchmark's `--out` folder its own before anything is written there: a missing or
    empty folder, or one this benchmark marked, is marked and used; one srd marked for something
    else (a run, a student, another benchmark) or that holds files srd did not write is refused
    with SystemExit naming it. `legacy_ok`: also accept an unmarked folder that an older version of
    the benchmark filled (its machines log, or nothing but srd's own folders, runs of an older srd, and the names in
    `own`, what the benchmark writes there itself), as the long resumable runs need; off for a
    benchmark that deletes runs in its folder."""
    from srd.config import is_run_folder
    from srd.utils import FolderError, claim_folder, is_srd_folder, is_srd_temporary

    folder = Path(folder)
    children = [p for p in folder.iterdir() if not is_srd_temporary(p)] if folder.is_dir() else []
    legacy = legacy_ok and (
        (folder / MACHINES_LOG).is_file()
        or all(p.name in own or (p.is_dir() and (is_srd_folder(p) or is_run_folder(p))) for p in children)
    )
    try:
        claim_folder(
            folder,
            kind,
            legacy=legacy,
            how=None,
            label="--out",
            choose="choose a new or empty folder" + ("" if legacy_ok else _DELETE_OLD),
        )
    except FolderError as e:
        raise SystemExit(f"error: {e}") from None


def log_machine(folder: Path) -> None:
    """Append this process's machine (after its allocator is set) to `<folder>/machines.jsonl`,
    one line per start of a benchmark that runs there: a record rewritten later from those runs
    (`--report-only`, perhaps on another machine) names the machines that made them."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    entry = {"at": dt.datetime.now().strftime("%Y-%m-%d %H:%M"), "command": command_line(sys.argv), **machine()}
    with (folder / MACHINES_LOG).open("a", encoding="utf-8") as f:  # one short line: appended whole
        f.write(json.dumps(entry) + "\n")


def logged_machines(folder: Path) -> list[str]:
    """One line per machine in `<folder>/machines.jsonl`, in order of first use: when it started
    a run there (first and last start, how many) and what it was. Unreadable lines are skipped
    (srd.runtime.environments reads them, as it reads a run folder's environment.jsonl)."""
    from srd.runtime import environments

    return [
        f"{first}{f' to {last}' if n > 1 else ''} ({n} start{'s' if n > 1 else ''}): "
        + ", ".join(f"{k} {v}" for k, v in entry.items())
        + "."
        for first, last, n, entry in environments(folder / MACHINES_LOG)
    ]


def header(title: str, runs: Path | None = None, wrote_only: bool = False) -> list[str]:
    """The first lines of a record: title, when and by which command, on which machine. With
    `runs` (a folder where log_machine logged the machines that ran there), those machines too;
    `wrote_only`: this process only wrote the record from finished runs (its machine is not theirs)."""
    this = ", ".join(f"{k} {v}" for k, v in machine().items())
    lines = [
        f"# {title}",
        "",
        f"Recorded {dt.datetime.now().strftime('%Y-%m-%d %H:%M')} by `{command_line(sys.argv)}`.",
        "",
        f"{'Machine that wrote this record' if wrote_only else 'Machine'}: {this}.",
        "",
    ]
    logged = logged_machines(runs) if runs is not None else []
    if logged:
        lines += [f"Machines that ran these runs (each start, from `{runs}/{MACHINES_LOG}`):", ""]
        lines += [f"- {m}" for m in logged] + [""]
    elif wrote_only:
        lines += ["The runs logged no machine (they predate the log); the line above is not theirs.", ""]
    return lines


def _recorded_by(path: Path) -> str | None:
    """The command a record names in its header (`Recorded <when> by `<command>`.`), or None."""
    try:
        with path.open(encoding="utf-8") as f:
            for line in f.read(4096).splitlines():
                if line.startswith("Recorded ") and " by `" in line:
                    return line.split(" by `", 1)[1].rsplit("`", 1)[0]
    except (OSError, UnicodeDecodeError):
        return None
    return None


_SEAL = "<!-- written by a benchmark script; sha256 of the text above: {} -->"


def _sealed(text: str) -> str:
    """`text` with a last line holding its SHA-256: a later rewrite can tell whether anyone
    edited the record since (hand-written notes), and then leaves it alone."""
    import hashlib

    return f"{text}{_SEAL.format(hashlib.sha256(text.encode('utf-8')).hexdigest())}\n"


def _untouched(path: Path) -> bool:
    """Whether `path` is a record exactly as a benchmark script wrote it (its seal matches)."""
    import hashlib

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    body, _, last = text.rstrip("\n").rpartition("\n")
    body += "\n"
    return last == _SEAL.format(hashlib.sha256(body.encode("utf-8")).hexdigest())


def _same_run(a: str | None, b: str | None) -> bool:
    """Two commands of the same run: a record rewritten from its finished runs is that run's."""

    def run_of(cmd: str | None) -> list[str] | None:
        return None if cmd is None else [x for x in cmd.split() if x != "--report-only"]

    return a is not None and run_of(a) == run_of(b)


def _replaceable(path: Path, command: str) -> bool:
    """A record may be rewritten only by a rerun of the command that wrote it, and only if
    nobody has edited it since: srd never replaces a file it did not write."""
    return not path.exists() or (_same_run(_recorded_by(path), command) and _untouched(path))


def _free_beside(path: Path, command: str) -> Path:
    """`path`, or the first `-2`, `-3`, ... name beside it that this command may write."""
    candidate, n = path, 1
    while not _replaceable(candidate, command):
        n += 1
        candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
    return candidate


def default_record_path(name: str, command: str) -> Path:
    """benchmarks/results/<name>.md, unless a file there is another command's record, a record
    edited since it was written, or no record at all: then the first such free <name>-2.md, -3,
    ... A rerun of the same command (e.g. `--report-only` after its run) rewrites its own
    untouched record; it never replaces another run's, nor anyone's notes."""
    return _free_beside(ROOT / "benchmarks" / "results" / f"{name}.md", command)


def save_record(text: str, path: str | None, preset: str, kind: str) -> Path:
    """Write the record (sealed: see _sealed) and print it. Without a path:
    benchmarks/results/<date>-<preset>-<kind>.md; with or without one, a free `-N` name beside
    it where that file may not be replaced (default_record_path), said on stderr."""
    from srd.utils import atomic_write_text

    command = command_line(sys.argv)
    default = ROOT / "benchmarks" / "results" / f"{dt.date.today().isoformat()}-{preset}-{kind}.md"
    wanted = Path(path) if path else default
    record = _free_beside(wanted, command)
    if record != wanted:
        why = (
            "was edited since it was written"
            if _same_run(_recorded_by(wanted), command)
            else "is another command's record"
            if _recorded_by(wanted)
            else "is not a benchmark record"
        )
        print(f"record: {wanted} {why}; it is left as it is and this record goes to {record}", file=sys.stderr)
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, _sealed(text))
    print(text)
    print(f"record: {record}")
    return record
