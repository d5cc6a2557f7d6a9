"""The teacher store (loss.teacher_top_k): bytes per target position, what float16 storage changes
in the loss, reuse by a second run, a flipped byte in a copied entry, and the memory a KD step
saves when the teacher's weights are not in memory.

    python benchmarks/teacher_store.py --student runs/students/smollm2-20l-healed

On the bundled teacher (SmolLM2-135M-Instruct) and a student folder (the healed 20-layer one of
the quality presets: `srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 --out
runs/students/smollm2-20l-healed`), over the first --rows Dolly training rows (alpaca template,
prompts of up to 256 tokens, rows of up to 384), top-k = 64 and temperatures 1, 1.5 and 2:

1. Build the rows into a new store (timed), and print its entry's summary (bytes per position).
2. Build again with the rows in another order (another seed's run): nothing is computed.
3. The loss from the store against the float32 buckets the store was built from and against the
   dense teacher: forward KL of the student to the teacher per target position, at each
   temperature, and the largest difference of a bucket probability (float16 storage's effect).
4. Copy the entry to another folder (as to another machine) and verify it; flip one byte of the
   copy and verify again.
5. One KD step (forward KL at tau 1 plus CE, backward, AdamW) in a fresh process each: with the
   teacher loaded and run (dense), and with the student alone reading the store. Peak RSS of each.

The record goes to benchmarks/results/DATE-cpu-teacher-store.md.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, header, save_record  # noqa: E402

TAUS = (1.0, 1.5, 2.0)


def _encoded(tokenizer: Any, rows: int) -> list[Any]:
    from srd.data.sources import load_examples
    from srd.data.tokenize import encode_examples

    return encode_examples(tokenizer, load_examples("dolly", limit=rows), fmt="alpaca", max_prompt_len=256, max_len=384)


def _load(spec: str, dtype: str) -> Any:
    import torch

    from srd.models.load import load_model

    return load_model(spec, dtype=getattr(torch, dtype)).eval()


def _batches(enc: list[Any], size: int) -> list[list[Any]]:
    return [enc[i : i + size] for i in range(0, len(enc), size)]


def fidelity(teacher: Any, student: Any, tokenizer: Any, enc: list[Any], store: Any, batch: int) -> dict[str, Any]:
    """Forward KL per target position from dense logits, float32 buckets and the stored buckets;
    the largest bucket-probability difference between the float32 and the stored buckets."""
    import torch

    from srd.data.tokenize import collate, pad_id
    from srd.losses.kd import SparseTeacher, kd_loss_sums
    from srd.models.features import target_features
    from srd.train.teacher_store import at_temperature, feature_buckets

    vocab, k = len(tokenizer), int(store.meta["top_k"])
    sums = {(tau, src): 0.0 for tau in TAUS for src in ("dense", "float32 buckets", "store")}
    max_dp = dict.fromkeys(TAUS, 0.0)
    n = 0
    with torch.no_grad():
        for part in _batches(enc, batch):
            b = collate(part, pad_id(tokenizer))
            tf, _, _, th = target_features(teacher, b["input_ids"], b["attention_mask"], b["labels"])
            sf, y, _, sh = target_features(student, b["input_ids"], b["attention_mask"], b["labels"])
            t_logits, s_logits = th(tf).float()[:, :vocab], sh(sf).float()[:, :vocab]
            ids, buckets = feature_buckets(tf, th, vocab, k, TAUS)
            n += len(y)
            for tau in TAUS:
                exact = at_temperature(ids, buckets, TAUS, tau)
                stored: SparseTeacher = store.rows(part, "cpu", tau)
                assert torch.equal(stored.ids, exact.ids)
                for src, t_in in (("dense", t_logits), ("float32 buckets", exact), ("store", stored)):
                    sums[(tau, src)] += kd_loss_sums(s_logits, t_in, y, divergence="fkl", tau=tau).kd.item()
                dp = (torch.softmax(exact.buckets / tau, -1) - torch.softmax(stored.buckets / tau, -1)).abs().max()
                max_dp[tau] = max(max_dp[tau], dp.item())
    return {"positions": n, "kd": {f"{t}|{s}": v / n for (t, s), v in sums.items()}, "max_dp": max_dp}


def child(args: argparse.Namespace) -> int:
    """One KD step in this process (dense: teacher loaded and run; store: the student alone)."""
    import torch

    from srd.data.tokenize import collate, pad_id
    from srd.losses.kd import combine
    from srd.models.features import teacher_features
    from srd.models.load import load_tokenizer
    from srd.train.step import DistillModule
    from srd.train.teacher_store import TeacherStore

    tokenizer = load_tokenizer(args.student)
    enc = _encoded(tokenizer, args.batch)
    b = collate(enc, pad_id(tokenizer))
    student = _load(args.student, "float32").train()
    teacher = _load(args.teacher, args.dtype) if args.child == "dense" else None
    store = TeacherStore.open(Path(args.entry)) if args.child == "store" else None
    module = DistillModule(
        student, divergence="fkl", tau=1.0, beta=None, chunk_size=1024, vocab_size=len(tokenizer), recompute=False
    )
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if teacher is not None:
            with torch.no_grad():
                t_in, t_head = teacher_features(teacher, b)
        else:
            t_in, t_head = store.rows(enc, "cpu", 1.0), None
        sums = module(b["input_ids"], b["attention_mask"], b["labels"], t_in, t_head)
        combine(sums, alpha=0.3, kd_scale=1.0, denominator=float(sums.n_tokens)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"peak_rss_gib": peak, "step_s": sorted(times)[len(times) // 2], "tokens": int(sums.n_tokens)}))
    return 0


def _run_child(args: argparse.Namespace, mode: str, entry: Path) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", mode, "--entry", str(entry), "--teacher", args.teacher]
    cmd += ["--student", args.student, "--batch", str(args.batch), "--dtype", args.dtype, "--steps", str(args.steps)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student", default="runs/students/smollm2-20l-healed")
    p.add_argument("--rows", type=int, default=64)
    p.add_argument("--k", type=int, default=64)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument(
        "--rows-per-forward", type=int, default=1, help="rows per teacher forward pass in the store build (runs: 1)"
    )
    p.add_argument("--steps", type=int, default=3, help="KD steps per process in part 5 (the median is reported)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="the teacher's precision")
    p.add_argument("--record", default=None)
    p.add_argument("--note", action="append", default=[])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--entry", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args)

    import torch

    from srd.models.load import load_tokenizer
    from srd.train.teacher_store import TeacherStore, entry_meta

    tokenizer = load_tokenizer(args.student)
    teacher, student = _load(args.teacher, args.dtype), _load(args.student, "float32")
    enc = _encoded(tokenizer, args.rows)
    meta = entry_meta(teacher, len(tokenizer), args.k)
    work = Path(tempfile.mkdtemp(prefix="srd-store-bench-"))
    try:
        store = TeacherStore(work / "store", meta)
        t0 = time.perf_counter()
        first = store.build(teacher, tokenizer, enc, TAUS, rows_per_forward=args.rows_per_forward)
        first_wall = time.perf_counter() - t0
        shuffled = list(enc)
        random.Random(7).shuffle(shuffled)
        t0 = time.perf_counter()
        second = TeacherStore(work / "store", meta).build(
            teacher, tokenizer, shuffled, TAUS, rows_per_forward=args.rows_per_forward
        )
        second_wall = time.perf_counter() - t0
        summary = store.summary()
        fid = fidelity(teacher, student, tokenizer, enc, store, args.batch)
        copy = work / "copy" / store.folder.name
        shutil.copytree(store.folder, copy)
        clean = TeacherStore.open(copy).verify()
        shard = sorted(copy.glob("shard-*.logits.npy"))[0]
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0x10
        shard.write_bytes(bytes(data))
        flipped = TeacherStore.open(copy).verify()
        del teacher, student
        memory = {mode: _run_child(args, mode, store.folder) for mode in ("dense", "store")}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    kd = fid["kd"]
    lines = header("Teacher store, bundled teacher -> healed 20-layer student")
    lines += [
        f"{args.rows} Dolly training rows, {fid['positions']} target positions; teacher {args.teacher} in "
        f"{args.dtype}, student `{args.student}`; k = {args.k}, temperatures {', '.join(f'{t:g}' for t in TAUS)}; "
        f"torch threads {torch.get_num_threads()}; rows per teacher forward pass in the build: "
        f"{args.rows_per_forward}.",
        "",
        "## Size and reuse",
        "",
        "| what | value |",
        "|---|---|",
        f"| rows built, first run | {first.rows} in {first.seconds:.1f} s ({first_wall:.1f} s wall) |",
        f"| rows built, second run (same rows, another order) | {second.rows} in {second_wall:.2f} s wall |",
        f"| stored bytes | {summary['bytes']:,} for {summary['positions']:,} target positions |",
        f"| bytes per target position | **{summary['bytes_per_position']:.1f}** "
        f"(ids uint16: {2 * args.k}; logits float16: {2 * (args.k + len(TAUS))}; .npy headers the rest) |",
        f"| float32 ids and logits, as the per-run cache stored them | {4 * args.k + 4 * (args.k + len(TAUS))} |",
        "",
        "## The loss from the store (forward KL, student to teacher, per target position)",
        "",
        "| tau | dense teacher | float32 top-64 buckets | store (float16) | store / float32 buckets - 1 | "
        "largest bucket probability difference |",
        "|---|---|---|---|---|---|",
    ]
    for tau in TAUS:
        d, f, s = kd[f"{tau}|dense"], kd[f"{tau}|float32 buckets"], kd[f"{tau}|store"]
        lines.append(f"| {tau:g} | {d:.5f} | {f:.5f} | {s:.5f} | {s / f - 1:+.2e} | {fid['max_dp'][tau]:.2e} |")
    lines += [
        "",
        "## A copied entry, verified",
        "",
        f"- the copy as made: {'no damaged file' if not clean else clean}",
        f"- one byte flipped in `{shard.name}`: {len(flipped)} damaged file(s) named: "
        f"`{flipped[0].split(': ', 1)[1] if flipped else '-'}`",
        "",
        f"## One KD step of {args.batch} rows, each in a fresh process (median of {args.steps} steps)",
        "",
        "| step | peak RSS (GiB) | step (s) |",
        "|---|---|---|",
        f"| dense: teacher loaded and run | {memory['dense']['peak_rss_gib']:.2f} | {memory['dense']['step_s']:.2f} |",
        f"| store: the student alone | {memory['store']['peak_rss_gib']:.2f} | {memory['store']['step_s']:.2f} |",
        "",
        f"Peak memory saved: {memory['dense']['peak_rss_gib'] - memory['store']['peak_rss_gib']:.2f} GiB "
        f"({memory['store']['peak_rss_gib'] / memory['dense']['peak_rss_gib']:.2f}x).",
    ]
    if args.note:
        lines += ["", "## Notes", "", *args.note]
    save_record("\n".join(lines) + "\n", args.record, "cpu", "teacher-store")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
