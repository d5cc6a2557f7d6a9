"""What a stored teacher row depends on besides the row: the rows built beside it, and how the
bf16 teacher was made from float32 weights.

    python benchmarks/teacher_store_rows.py [--rows 96] [--batch 4] [--device cuda]

The bundled teacher (SmolLM2-135M-Instruct) in bf16 over the first --rows Dolly training rows (the
quality presets' alpaca template, prompts of up to 256 tokens, rows of up to 384), top-k = 64,
temperatures 1, 1.5 and 2:

1. Rows per teacher forward pass --batch (padded batches, longest first: how store format 2
   built) and 1 (each row alone: how srd builds now). For each: build all rows into a new store
   (timed), then every third row in reverse order into another (a run that keeps a subset of the
   rows, as SRD's stages do), and compare the rows the two share: rows whose stored values are
   not bit-identical, target positions whose top-k set differs, the largest difference of a
   logit where the sets agree.
2. The teacher made with `model.to(torch.bfloat16)` (which also rounds the rotary frequencies,
   as srd's training loop did) against `cast_parameters` (parameters only, as
   `from_pretrained(dtype=torch.bfloat16)` leaves the buffers): the same comparison of their
   stored rows, and the teacher's cross-entropy on the reference answers under each and in
   float32.

The record goes to benchmarks/results/DATE-cpu-teacher-store-rows.md (DATE-gpu-... with --device cuda).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import header, save_record  # noqa: E402

TAUS = (1.0, 1.5, 2.0)


def compare(a: Any, b: Any, rows: list[Any], k: int) -> dict[str, float]:
    """Rows not bit-identical between two stores, positions whose top-k id sets differ, and the
    largest logit difference where they agree (ids matched, tau 1)."""
    import torch

    differ, other_set, largest = 0, 0, 0.0
    for e in rows:
        x, y = a.rows([e], "cpu", 1.0), b.rows([e], "cpu", 1.0)
        differ += not all(
            torch.equal(p.ids, q.ids) and torch.equal(p.buckets, q.buckets)
            for p, q in ((a.rows([e], "cpu", t), b.rows([e], "cpu", t)) for t in TAUS)
        )
        xs, xo = x.ids.sort(1)
        ys, yo = y.ids.sort(1)
        same = (xs == ys).all(1)
        other_set += int((~same).sum())
        if same.any():
            xl, yl = x.buckets[:, :k].gather(1, xo)[same], y.buckets[:, :k].gather(1, yo)[same]
            largest = max(largest, float((xl - yl).abs().max()))
    return {"rows": differ, "positions": other_set, "largest": largest}


def teacher_ce(model: Any, tokenizer: Any, rows: list[Any]) -> float:
    """Mean cross-entropy (nats per target token) of the teacher on the reference answers, each
    row alone."""
    import torch
    import torch.nn.functional as F

    from srd.data.tokenize import collate, pad_id
    from srd.models.features import target_features

    total, n = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for e in rows:
            b = {k: v.to(device) for k, v in collate([e], pad_id(tokenizer)).items()}
            feats, y, _, head = target_features(model, b["input_ids"], b["attention_mask"], b["labels"])
            total += float(F.cross_entropy(head(feats).float(), y, reduction="sum"))
            n += len(y)
    return total / n


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--rows", type=int, default=96)
    p.add_argument("--batch", type=int, default=4, help="rows per forward pass of the batched build")
    p.add_argument("--k", type=int, default=64, help="top-k logits stored per position")
    p.add_argument("--device", default="cpu", help="where the teacher runs (cpu, cuda)")
    p.add_argument("--record", default=None)
    p.add_argument("--note", action="append", default=[])
    args = p.parse_args(argv)

    import torch

    from srd.data.sources import load_examples
    from srd.data.tokenize import encode_examples
    from srd.models.load import cast_parameters, load_model, load_tokenizer
    from srd.train.teacher_store import TeacherStore, entry_meta

    tokenizer = load_tokenizer(args.teacher)
    examples = load_examples("dolly", limit=args.rows)
    enc = encode_examples(tokenizer, examples, fmt="alpaca", max_prompt_len=256, max_len=384)
    subset = list(reversed(enc[::3]))
    fp32 = load_model(args.teacher).to(args.device).eval()
    made = cast_parameters(load_model(args.teacher), torch.bfloat16, args.device).eval()
    rounded = load_model(args.teacher).to(device=args.device, dtype=torch.bfloat16).eval()
    meta = entry_meta(made, len(tokenizer), args.k)
    positions = sum(e.n_loss_targets for e in enc)

    grouping: dict[int, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="srd-store-rows-") as tmp:
        work = Path(tmp)
        for per in (args.batch, 1):
            whole = TeacherStore(work / f"all-{per}", meta)
            t0 = time.perf_counter()
            whole.build(made, tokenizer, enc, TAUS, rows_per_forward=per)
            seconds = time.perf_counter() - t0
            part = TeacherStore(work / f"part-{per}", meta)
            part.build(made, tokenizer, subset, TAUS, rows_per_forward=per)
            grouping[per] = {"seconds": seconds, **compare(whole, part, subset, args.k), "store": whole}
        old = TeacherStore(work / "rounded", meta)
        old.build(rounded, tokenizer, enc, TAUS)
        rope = compare(grouping[1]["store"], old, enc, args.k)
        ce = {name: teacher_ce(m, tokenizer, enc) for name, m in (("fp32", fp32), ("made", made), ("rounded", rounded))}

    lines = header("What a stored teacher row depends on: its neighbours and the bf16 cast")
    lines += [
        f"{args.rows} Dolly training rows ({positions:,} target positions), teacher {args.teacher} in bf16, "
        f"k = {args.k}, temperatures {', '.join(f'{t:g}' for t in TAUS)}; the subset is every third row in reverse "
        f"order ({len(subset)} rows); device {args.device}, torch threads {torch.get_num_threads()}.",
        "",
        "## Rows per teacher forward pass",
        "",
        "| rows per forward | build of all rows (s) | shared rows not bit-identical | positions with another "
        "top-k set | largest logit difference (same set) |",
        "|---|---|---|---|---|",
    ]
    for per in (args.batch, 1):
        g = grouping[per]
        lines.append(
            f"| {per} | {g['seconds']:.1f} | {g['rows']} of {len(subset)} | {g['positions']:,} | {g['largest']:.4f} |"
        )
    lines += [
        "",
        f"Building each row alone took {grouping[1]['seconds'] / grouping[args.batch]['seconds']:.2f}x the time of "
        f"batches of {args.batch}.",
        "",
        "## The bf16 teacher: `model.to(torch.bfloat16)` against `cast_parameters`",
        "",
        "| what | value |",
        "|---|---|",
        f"| rows not bit-identical | {rope['rows']} of {len(enc)} |",
        f"| positions with another top-k set | {rope['positions']:,} of {positions:,} |",
        f"| largest logit difference (same set) | {rope['largest']:.4f} |",
        f"| teacher CE, float32 | {ce['fp32']:.4f} |",
        f"| teacher CE, bf16 by `cast_parameters` (rotary frequencies float32) | {ce['made']:.4f} |",
        f"| teacher CE, bf16 by `model.to` (rotary frequencies rounded) | {ce['rounded']:.4f} |",
    ]
    if args.note:
        lines += ["", "## Notes", "", *args.note]
    where = "cpu" if args.device == "cpu" else "gpu"
    save_record("\n".join(lines) + "\n", args.record, where, "teacher-store-rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
