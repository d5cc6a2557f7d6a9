"""Shared by the benchmark scripts: the machine description and the markdown record they write."""

from __future__ import annotations

import contextlib
import datetime as dt
import importlib.metadata
import os
import platform
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
    """CPU / GPU, core count, library versions: what a recorded number depends on."""
    import accelerate
    import torch
    import transformers

    from srd.models.load import native_bf16

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    for optional in ("peft", "trl", "deepspeed"):  # named in a record only where installed
        try:
            info[optional] = importlib.metadata.version(optional)
        except importlib.metadata.PackageNotFoundError:
            pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    # what the CPU's matmuls can use: recorded CPU numbers differ by several times between an
    # AVX2 machine and one with AVX-512 and native bf16 (both were seen as "2-core AMD EPYC")
    info["cpu_isa"] = torch.backends.cpu.get_cpu_capability()
    info["cpu_native_bf16"] = native_bf16("cpu")
    # large CPU tensors reuse freed pages (srd.utils.tune_cpu_allocator, as the srd CLI does) or
    # page-fault every allocation afresh (glibc's default): a 16-26% difference in a KD step here
    from srd.utils import cpu_allocator_tuned

    info["cpu_malloc"] = "tuned" if cpu_allocator_tuned() else "default"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def command_line(argv: list[str], elide: tuple[str, ...] = ("--note",)) -> str:
    """The command as typed, with the values of `elide` options (long prose) shown as '...'."""
    out, skip = [], False
    for a in argv:
        out.append("'...'" if skip else a)
        skip = a in elide
    return " ".join(["python", *out])


MACHINES_LOG = "machines.jsonl"


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
    a run there (first and last start, how many) and what it was. Unreadable lines are skipped."""
    import json

    seen: dict[str, list[str]] = {}
    try:
        text = (folder / MACHINES_LOG).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
            at = str(entry.pop("at"))
            entry.pop("command", None)
        except (ValueError, KeyError, AttributeError):
            continue
        seen.setdefault(", ".join(f"{k} {v}" for k, v in entry.items()), []).append(at)
    return [
        f"{ats[0]}{f' to {ats[-1]}' if len(ats) > 1 else ''} ({len(ats)} start{'s' if len(ats) > 1 else ''}): {desc}."
        for desc, ats in seen.items()
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


def default_record_path(name: str, command: str) -> Path:
    """benchmarks/results/<name>.md, unless a record there names another command (another
    benchmark run the same day): then the first free <name>-2.md, -3, ... A rerun of the same
    command (e.g. `--report-only` after its run) rewrites its own record; it never replaces
    another run's."""
    folder = ROOT / "benchmarks" / "results"

    def run_of(cmd: str | None) -> list[str] | None:  # a record rewritten from its finished runs is the same run's
        return None if cmd is None else [a for a in cmd.split() if a != "--report-only"]

    candidate, n = folder / f"{name}.md", 1
    while candidate.exists() and run_of(_recorded_by(candidate)) != run_of(command):
        n += 1
        candidate = folder / f"{name}-{n}.md"
    return candidate


def save_record(text: str, path: str | None, preset: str, kind: str) -> Path:
    """Write the record and print it. Without a path: benchmarks/results/<date>-<preset>-<kind>.md,
    or a free `-N` name beside it where that file is another command's record."""
    from srd.utils import atomic_write_text

    record = (
        Path(path)
        if path
        else default_record_path(f"{dt.date.today().isoformat()}-{preset}-{kind}", command_line(sys.argv))
    )
    record.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(record, text)
    print(text)
    print(f"record: {record}")
    return record
