"""Do two `srd run` directories hold the same numbers? For checking that a refactor changed no
behaviour: the same recipe run before and after gives, to the last digit, the same reflection
manifest, training losses and gradient norms at every step, dev metrics at every evaluation,
chosen checkpoints and evaluation answers and scores. Times are left out (they always differ).

    python benchmarks/same_numbers.py RUN_BEFORE RUN_AFTER [--record FILE]

Exit status 0 when everything compared is identical, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import command_line, header, save_record  # noqa: E402

TIMING = {"elapsed_s", "tokens_per_s", "wall_time_s", "s", "seconds", "generation_s", "teacher_cache_s", "measure_s"}


def _rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _strip(obj: Any) -> Any:
    """The object without timing fields (at any depth) or absolute paths."""
    if isinstance(obj, dict):
        return {k: _strip(v) for k, v in obj.items() if k not in TIMING and not k.endswith("_s")}
    if isinstance(obj, list):
        return [_strip(v) for v in obj]
    return obj


def compared_files(run: Path) -> list[Path]:
    """Every file whose numbers a behaviour change would move, relative to the run folder."""
    pats = [
        "reflection/manifest.jsonl",
        "**/logs/train.jsonl",
        "**/logs/eval.jsonl",
        "**/best/metrics.json",
        "**/eval/*/*/*.jsonl",
        "**/eval/*/summary.json",
        "**/stages/*/examples.json",
    ]
    found = {p.relative_to(run) for pat in pats for p in run.glob(pat)}
    return sorted(found)


def compare(a: Path, b: Path) -> tuple[list[str], list[str]]:
    """(lines of the comparison, files that differ)."""
    lines, differ = [], []
    files_a, files_b = compared_files(a), compared_files(b)
    for rel in sorted(set(files_a) | set(files_b)):
        pa, pb = a / rel, b / rel
        if not (pa.exists() and pb.exists()):
            lines.append(f"- `{rel}`: only in {'the first' if pa.exists() else 'the second'} run")
            differ.append(str(rel))
            continue
        load = _rows if rel.suffix == ".jsonl" else (lambda p: json.loads(p.read_text()))
        x, y = _strip(load(pa)), _strip(load(pb))
        same = x == y
        n = len(x) if isinstance(x, list) else 1
        lines.append(f"- `{rel}`: {'identical' if same else 'DIFFERENT'} ({n} rows)")
        if not same:
            differ.append(str(rel))
    return lines, differ


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("before", type=Path)
    p.add_argument("after", type=Path)
    p.add_argument("--record", default=None, help="also write the comparison to this markdown record")
    p.add_argument("--note", action="append", default=[], help="a paragraph for the record")
    args = p.parse_args(argv)
    lines, differ = compare(args.before, args.after)
    verdict = "every compared number is identical" if not differ else f"{len(differ)} files differ"
    text = "\n".join([f"`{args.before}` against `{args.after}`: {verdict}.", "", *lines, ""])
    if not args.record:
        print(text)
    else:
        title = "Same numbers before and after a change"
        cmd = command_line(sys.argv if argv is None else ["benchmarks/same_numbers.py", *argv])
        body = "\n".join([*header(title), "", "```bash", cmd, "```", "", *[f"{n}\n" for n in args.note], text])
        save_record(body, args.record, "same-numbers", "refactor-check")
    return 0 if not differ else 1


if __name__ == "__main__":
    sys.exit(main())
