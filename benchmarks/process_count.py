"""One process against two: the same `srd train` steps under DDP, FSDP and DeepSpeed ZeRO-2.
(Not named multiprocess.py: a script's folder comes first on sys.path, and `datasets` imports
the `multiprocess` package.)

    python benchmarks/process_count.py --preset cpu     # bundled teacher -> healed 20-layer student, 2 CPU processes

Every run trains the same optimizer steps on the same micro-batches: one process with
`train.grad_accum=2` (the reference), then two processes (torchrun, gloo on a CPU) with
`train.grad_accum=1` and `train.sharding` none (DDP), fsdp (FSDP2) and zero2 (DeepSpeed ZeRO-2,
skipped when DeepSpeed is not installed). Reported per run: median seconds per optimizer step
(after the first), the largest relative difference of the logged losses and gradient norms from
the reference's, the largest absolute difference of the final weights, and the peak resident
memory of the largest process. The record goes to benchmarks/results/DATE-<preset>-process-count.md.
On a 2-core CPU, two processes of one thread each share the cores that one process uses with
two threads: this measures correctness and memory, not a speed-up (that needs a GPU per process).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "cpu": [
        "configs/kd-smollm2-quick.yaml",
        "model.student=runs/students/smollm2-20l-healed",
        "data.train_limit=64",
        "data.dev_limit=8",
        "train.max_steps=6",
        "train.batch_size=4",
        "train.eval_every=0",
        "train.save_every=100",
        "train.warmup_steps=0",
        "dev_eval.num_examples=0",
    ],
}
RUNS = {  # key: label, processes, extra overrides
    "one": ("1 process (reference)", 1, ["train.grad_accum=2"]),
    "ddp": ("2 processes, DDP", 2, ["train.grad_accum=1"]),
    "fsdp": ("2 processes, FSDP", 2, ["train.grad_accum=1", "train.sharding=fsdp"]),
    "zero2": ("2 processes, DeepSpeed ZeRO-2", 2, ["train.grad_accum=1", "train.sharding=zero2"]),
}

# runs one command and prints the peak RSS (KiB) of its largest descendant: RUSAGE_CHILDREN of a
# fresh process covers only that command's process tree
_PEAK = (
    "import resource, subprocess, sys; rc = subprocess.run(sys.argv[1:]).returncode; "
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(rc)"
)


def _log(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "logs" / "train.jsonl").read_text().splitlines()]


def _rel(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b, strict=True))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument(
        "--out", default="runs/process-count", help="folder for the runs (new, or this benchmark's own: runs replaced)"
    )
    p.add_argument("--record", default=None)
    p.add_argument("--port", type=int, default=29561)
    p.add_argument(
        "--runs", nargs="+", default=list(RUNS), choices=list(RUNS), help="which runs (one always runs first)"
    )
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run")
    args = p.parse_args(argv)
    out = Path(args.out)
    from benchmarks.common import claim_out

    claim_out(out, "process-count benchmark", legacy_ok=False)  # its runs are deleted below: only in its own folder
    rows, ref = [], None
    keys = ["one"] + [k for k in args.runs if k != "one"]
    for i, (label, n, extra) in enumerate(RUNS[k] for k in keys):
        if "train.sharding=zero2" in extra and importlib.util.find_spec("deepspeed") is None:
            rows.append(f"| {label} | not run: DeepSpeed is not installed (`pip install deepspeed`) | | | | |")
            continue
        name = f"run{i}"
        shutil.rmtree(out / name, ignore_errors=True)  # this benchmark's earlier run of the same name: measured afresh
        srd = [*PRESETS[args.preset], *extra, *args.overrides, f"output_dir={out}", f"name={name}"]
        launcher = ["-m", "srd.cli"]
        if n > 1:
            launcher = ["-m", "torch.distributed.run", "--nproc_per_node", str(n), "--master_port", str(args.port + i)]
            launcher += ["-m", "srd.cli"]
        cmd = [sys.executable, "-c", _PEAK, sys.executable, *launcher, "train", "--no-progress", *srd]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // n))}
        print(f"== {label}: {' '.join(cmd[3:])}", flush=True)
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        peak = next((int(x.split()[1]) for x in proc.stdout.splitlines() if x.startswith("PEAK_KIB")), 0)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            rows.append(f"| {label} | failed (exit {proc.returncode}) | | | | |")
            continue
        run = out / name
        log = _log(run)
        steps = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(log, log[1:])]
        from safetensors.torch import load_file

        weights = load_file(run / "final" / "model.safetensors")
        if ref is None:
            ref = (log, weights)
            cells = "(reference) | | "
        else:
            losses = _rel([r["loss"] for r in ref[0]], [r["loss"] for r in log])
            norms = _rel([r["grad_norm"] for r in ref[0]], [r["grad_norm"] for r in log])
            w = max(float((weights[k].double() - ref[1][k].double()).abs().max()) for k in ref[1])
            cells = f"{losses:.1e} | {norms:.1e} | {w:.1e}"
        step = f"{statistics.median(steps):.2f}" if steps else "-"
        rows.append(f"| {label} | {step} | {cells} | {peak / 2**20:.2f} |")
        print(rows[-1], flush=True)
    from benchmarks.common import header, save_record

    lines = header(f"One process against two, preset `{args.preset}`") + [
        f"`srd train {' '.join(PRESETS[args.preset] + args.overrides)}`; one process with train.grad_accum=2, two "
        "processes (torchrun) with train.grad_accum=1: the same micro-batches in every optimizer step. "
        "OMP_NUM_THREADS = cores / processes. Step time: the median over every step after the first. "
        "Differences against the 1-process run: the largest relative difference of the logged losses and gradient "
        "norms over all steps, and the largest absolute difference of any final weight.",
        "",
        "| run | s/step (median) | loss rel. diff | grad-norm rel. diff | max weight diff | peak RSS of the largest "
        "process (GiB) |",
        "|---|---|---|---|---|---|",
        *rows,
    ]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "process-count")
    return 0


if __name__ == "__main__":
    sys.exit(main())
