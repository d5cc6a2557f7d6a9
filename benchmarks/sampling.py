"""The cost of drawing one token per row: srd's per-row counter-based draw against torch's.

    python benchmarks/sampling.py                      # CPU: 16 rows x 49,152 (a CPU decode step)
    python benchmarks/sampling.py --rows 256 --device cuda   # a GPU decode step at batch 256

Three ways to draw from softmax(scores) for a (rows, vocabulary) batch of scores:
  * `one generator`: one torch.multinomial call with one generator for the batch (fast, but
    what a row draws depends on the rows drawn with it: batch size, process, resumption);
  * `a generator per row`: one torch.multinomial call per row, each with its own seeded
    generator (independent rows; what the decode loop did before `sample_rows`);
  * `sample_rows`: srd.generation.decode.sample_rows, one vectorised Gumbel-max draw whose noise is
    hashed from (the row's seed, the token position, the token): independent rows.
Each is timed over --repeats calls after warm-up; scores are random (scale 3). Also counted:
how many of --draws draws change when the logits move by 1e-5 (what a different batch shape
does to their last bits), for sample_rows and for per-row generators. The record goes to
benchmarks/results/DATE-<cpu|gpu>-sampling.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _time(fn, repeats: int, sync) -> float:
    for _ in range(3):
        fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync()
    return (time.perf_counter() - t0) / repeats


def _measure(rows: int, vocab: int, device, repeats: int, sync, g) -> tuple[float, float, float]:
    """Seconds per call: one generator, a generator per row, sample_rows."""
    import torch

    from srd.generation.decode import row_seeds, sample_rows, seed_keys

    scores = (3 * torch.randn(rows, vocab, generator=g)).to(device)
    keys = seed_keys(row_seeds(0, rows)).to(device)
    counters = torch.zeros(rows, dtype=torch.long, device=device)
    one = torch.Generator(device=device).manual_seed(0)
    gens = [torch.Generator(device=device).manual_seed(s) for s in range(rows)]

    def batch():
        return torch.multinomial(torch.softmax(scores, -1), 1, generator=one)

    def per_row():
        probs = torch.softmax(scores, -1)
        return torch.cat([torch.multinomial(probs[r], 1, generator=gens[r]) for r in range(rows)])

    def counter():
        return sample_rows(scores, keys, counters)

    return tuple(_time(f, repeats, sync) for f in (batch, per_row, counter))


def flips(vocab: int, draws: int, device) -> tuple[int, int]:
    """Draws (of `draws`, one seed each) that change under 1e-5 logit noise: sample_rows, and
    torch.multinomial with a generator per seed."""
    import torch

    from srd.generation.decode import row_seeds, sample_rows, seed_keys

    g = torch.Generator().manual_seed(0)
    logits = (3 * torch.randn(1, vocab, generator=g)).to(device)
    nudged = logits + (1e-5 * torch.randn(1, vocab, generator=g)).to(device)
    keys = seed_keys(row_seeds(0, draws)).to(device)
    counters = torch.zeros(draws, dtype=torch.long, device=device)
    changed = 0
    for i in range(0, draws, 100):
        k, c = keys[i : i + 100], counters[i : i + 100]
        n = len(k)
        changed += int((sample_rows(logits.expand(n, -1), k, c) != sample_rows(nudged.expand(n, -1), k, c)).sum())
    p, q = torch.softmax(logits[0], -1), torch.softmax(nudged[0], -1)
    per_row = 0
    for i in range(draws):
        a = torch.multinomial(p, 1, generator=torch.Generator(device=device).manual_seed(i))
        b = torch.multinomial(q, 1, generator=torch.Generator(device=device).manual_seed(i))
        per_row += int(a.item() != b.item())
    return changed, per_row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, nargs="+", default=[16])
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--draws", type=int, default=2000, help="draws in the logit-noise count")
    p.add_argument("--record", default=None)
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import header, save_record

    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    g = torch.Generator().manual_seed(0)
    lines = header("Drawing one token per row: counter-based sample_rows against torch.multinomial") + [
        f"Device {device}, vocabulary {args.vocab}, float32 scores (random, scale 3); mean of "
        f"{args.repeats} calls after 3 warm-up calls, synchronised on a GPU.",
        "",
        "| rows | one generator (ms) | a generator per row (ms) | sample_rows (ms) | sample_rows vs per row |",
        "|---|---|---|---|---|",
    ]
    for rows in args.rows:
        t_batch, t_rows, t_counter = _measure(rows, args.vocab, device, args.repeats, sync, g)
        lines.append(
            f"| {rows} | {t_batch * 1e3:.2f} | {t_rows * 1e3:.2f} | {t_counter * 1e3:.2f} | "
            f"{t_rows / t_counter:.1f}x faster |"
        )
        print(lines[-1], flush=True)
    ours, theirs = flips(args.vocab, args.draws, device)
    lines += [
        "",
        f"Draws changed by 1e-5 logit noise (one seed per draw, {args.draws} draws): sample_rows {ours}, "
        f"torch.multinomial with a generator per row {theirs}.",
    ]
    save_record("\n".join(lines) + "\n", args.record, "gpu" if device.type == "cuda" else "cpu", "sampling")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
