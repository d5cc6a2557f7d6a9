"""Matrix-multiply rates of the shapes srd's CPU numbers depend on, each timed alone.

    python benchmarks/gemm.py                    # float32
    python benchmarks/gemm.py --dtype bfloat16   # where the CPU has bf16 in hardware

Two questions it answers with measurements:
  * decoding: how a layer's time grows with the rows in a decode step (why the decode loop
    keeps its batch full), the same with the weights packed once for oneDNN (what
    srd.generation.packed decodes with on a CPU) and whether its products are the plain
    ones bit for bit, and the LM head of a 16-row step
    as F.linear, weight @ hidden.T (step_logits without packing) and packed;
  * training: the rate of the KD step's GEMM shapes (SmolLM2 20/30-layer bodies over 8 x 256
    tokens, the 49,152 x 576 head at 1,536 target positions), to compare with the step's
    measured time.
CPU tensors only. The record goes to benchmarks/results/DATE-cpu-gemm.md (DATE-cpu-gemm-bf16.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DECODE_LAYERS = [(576, 1536), (1536, 576)]  # SmolLM2 MLP up / down projections (in, out)
DECODE_ROWS = [1, 4, 16, 64]
HEAD = (576, 49152)  # hidden, vocabulary
STEP_SHAPES = [(2048, 576, 1536), (2048, 1536, 576), (2048, 576, 576), (1536, 576, 49152)]  # m, k, n


def _time(fn, repeats: int) -> float:
    for _ in range(2):
        fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--record", default=None)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = p.parse_args(argv)

    import torch
    import torch.nn.functional as F

    from benchmarks.common import header, save_record

    torch.manual_seed(0)
    dt = getattr(torch, args.dtype)
    native = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    lines = header(f"{args.dtype.capitalize()} GEMM rates of srd's shapes") + [
        f"{args.dtype.capitalize()} (bf16 in hardware: {native}), {torch.get_num_threads()} threads, each shape "
        f"timed alone: mean of {args.repeats} calls after 2 warm-up calls.",
        "",
        "## Decode-step layers: time against rows",
        "",
        "| layer (in x out) | rows | ms | GFLOP/s | packed for oneDNN: ms | speed-up | same bits |",
        "|---|---|---|---|---|---|---|",
    ]

    def packed(w):  # the weights packed once, as srd.generation.packed does; None without oneDNN's linear
        from srd.generation.packed import _ops_available

        if not _ops_available() or (w.dtype == torch.bfloat16 and not native):  # as srd.generation.packed
            return None
        pw = torch.ops.mkldnn._reorder_linear_weight(w, 16)
        return lambda x: torch.ops.mkldnn._linear_pointwise(x, pw, None, "none", [], "")

    for i, o in DECODE_LAYERS:
        w = torch.randn(o, i, dtype=dt)
        fast = packed(w)
        for m in DECODE_ROWS:
            x = torch.randn(m, i, dtype=dt)
            secs = _time(lambda x=x, w=w: F.linear(x, w), args.repeats)
            cells = "- | - | -"
            if fast is not None:
                p_secs = _time(lambda x=x, fast=fast: fast(x), args.repeats)
                same = "yes" if torch.equal(fast(x), F.linear(x, w)) else "no"
                cells = f"{p_secs * 1e3:.3f} | {secs / p_secs:.2f}x | {same}"
            lines.append(f"| {i} x {o} | {m} | {secs * 1e3:.3f} | {2 * m * i * o / secs / 1e9:.1f} | {cells} |")
    h, v = HEAD
    w = torch.randn(v, h, dtype=dt)
    x = torch.randn(16, h, dtype=dt)
    lin = _time(lambda: F.linear(x, w), max(3, args.repeats // 4))
    wt = _time(lambda: (w @ x.T).T, max(3, args.repeats // 4))
    fast = packed(w)
    pk = _time(lambda: fast(x), max(3, args.repeats // 4)) if fast is not None else None
    lines += [
        "",
        f"LM head {v} x {h}, 16 rows: F.linear {lin * 1e3:.1f} ms, weight @ hidden.T {wt * 1e3:.1f} ms "
        f"({lin / wt:.2f}x)"
        + (f", packed for oneDNN {pk * 1e3:.1f} ms ({wt / pk:.2f}x weight @ hidden.T)." if pk else "."),
        "",
        "## KD-step shapes",
        "",
        "| m x k x n | ms | GFLOP/s |",
        "|---|---|---|",
    ]
    for m, k, n in STEP_SHAPES:
        a, b = torch.randn(m, k, dtype=dt), torch.randn(k, n, dtype=dt)
        secs = _time(lambda a=a, b=b: a @ b, max(3, args.repeats // 4))
        lines.append(f"| {m} x {k} x {n} | {secs * 1e3:.1f} | {2 * m * k * n / secs / 1e9:.0f} |")
    save_record("\n".join(lines) + "\n", args.record, "cpu", "gemm" if args.dtype == "float32" else "gemm-bf16")
    return 0


if __name__ == "__main__":
    sys.exit(main())
