"""Does the code sandbox fail correct programs? Every MBPP reference solution run through
`srd.metrics.sandbox.run_tests` against its own asserts (and setup code), as `srd eval
--benchmarks mbpp` runs a model's answers: the count that pass, the ones that do not with
their error, the time per program and the isolation this machine allowed.

    SRD_ALLOW_CODE_EXECUTION=1 python benchmarks/sandbox_mbpp.py --data ../shared/data/mbpp/mbpp.jsonl

The reference solutions and the MBPP asserts are the data's own code: they run only with the
environment variable set, as every code execution in srd does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import header, save_record  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="MBPP JSONL (task_id, code, test_list, test_setup_code)")
    p.add_argument("--limit", type=int, default=None, help="only the first N tasks")
    p.add_argument("--record", default=None, help="where to write the record (default benchmarks/results/...)")
    args = p.parse_args(argv)

    from srd.metrics.sandbox import defined_names, isolation, require_code_execution, run_tests

    require_code_execution(True, "this benchmark")
    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()][: args.limit]
    failed = []
    t0 = time.perf_counter()
    for r in rows:
        res = run_tests(
            r["code"], r["test_list"], setup=r.get("test_setup_code") or "", entry_points=defined_names(r["code"])
        )
        if not res.all_passed:
            failed.append(f"| {r['task_id']} | {res.status} | {res.passed}/{res.total} | {(res.error or '')[:120]} |")
    seconds = time.perf_counter() - t0
    text = "\n".join(
        [
            *header("The code sandbox on MBPP's reference solutions"),
            f"- isolation on this machine: {isolation().description}",
            f"- reference solutions that pass all their asserts: **{len(rows) - len(failed)} of {len(rows)}**",
            f"- time per program (start, run, verdict): {1000 * seconds / max(1, len(rows)):.0f} ms",
            "",
            *(["| task | status | asserts passed | error |", "|---|---|---|---|", *failed] if failed else []),
        ]
    )
    save_record(text + "\n", args.record, "mbpp-references", "sandbox")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
