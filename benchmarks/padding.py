"""How much of a training batch is padding: random batches vs srd's length-bucketed batches.

    python benchmarks/padding.py                       # Dolly's 11,435 training rows, SmolLM2 tokenizer
    python benchmarks/padding.py --data gsm8k --batch-sizes 8 16

Training batches come from srd.data.tokenize.bucketed_batches (shuffled, then sorted by length
inside groups of 64 batches) and are padded to a multiple of 8 tokens. Every padded position
costs teacher and student compute, so the pad fraction bounds what packing several examples
into one row (block-diagonal attention, restarting position ids) could still save. Counts
tokens only, no model: runs in seconds. The record goes to
benchmarks/results/DATE-cpu-padding.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def pad_fraction(lengths: list[int], batches: list[list[int]], multiple: int = 8) -> float:
    """Share of the batches' padded token positions that are padding."""
    real = sum(lengths[i] for b in batches for i in b)
    padded = sum(-(-max(lengths[i] for i in b) // multiple) * multiple * len(b) for b in batches)
    return 1 - real / padded


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default="dolly", help="training data spec (default dolly)")
    p.add_argument("--tokenizer", default="smollm2-135m-instruct")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8, 16])
    p.add_argument("--max-prompt-len", type=int, default=256)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--record", default=None, help="markdown record path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    from benchmarks.common import header, save_record
    from srd.data.sources import load_examples
    from srd.data.tokenize import bucketed_batches, encode_examples
    from srd.models import load_tokenizer

    tokenizer = load_tokenizer(args.tokenizer)
    examples = load_examples(args.data)
    enc = encode_examples(tokenizer, examples, fmt="alpaca", max_prompt_len=args.max_prompt_len, max_len=args.max_len)
    lengths = [len(e.input_ids) for e in enc]
    lines = header("Padding in training batches") + [
        f"`{args.data}`: {len(lengths):,} rows, Alpaca template, prompt <= {args.max_prompt_len} and row <= "
        f"{args.max_len} tokens ({args.tokenizer} tokenizer): mean {sum(lengths) / len(lengths):.1f} tokens, "
        f"longest {max(lengths)}. One epoch's batches (seed 42), padded to a multiple of 8.",
        "",
        "| batch | random batches: padding | srd's bucketed batches: padding |",
        "|---|---|---|",
    ]
    for bs in args.batch_sizes:
        # bucket_size=1: groups of one batch, i.e. no sorting -- plain shuffled batches
        shuffled = bucketed_batches(lengths, bs, seed=42, epoch=0, bucket_size=1)
        bucketed = bucketed_batches(lengths, bs, seed=42, epoch=0)
        a, b = pad_fraction(lengths, shuffled), pad_fraction(lengths, bucketed)
        print(f"batch {bs}: random {a:.1%}, bucketed {b:.1%}")
        lines.append(f"| {bs} | {a:.1%} | {b:.1%} |")
    save_record("\n".join(lines) + "\n", args.record, "cpu", "padding")
    return 0


if __name__ == "__main__":
    sys.exit(main())
