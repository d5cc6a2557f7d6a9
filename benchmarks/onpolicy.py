"""On-policy (GKD) sampling: one decoding stream per micro-batch against one per optimizer step.

    python benchmarks/onpolicy.py --preset cpu     # bundled SmolLM2-135M, 4 micro-batches of 4 Dolly prompts
    python benchmarks/onpolicy.py --preset gpu     # random-init GPT-2 124M shapes, 4 micro-batches of 16 (gpu.sh)

GKD draws, per optimizer step, which micro-batches the student answers itself. srd samples all
of a step's on-policy micro-batches (on this process) in one continuous-batching stream
(srd.train.onpolicy.sample_responses); before, each micro-batch was its own batch, decoded
until its longest answer ended. Both ways use the same per-row seeds, so each row samples the
same answer (compared below, with the answers' token counts). Sampling at temperature 1,
top-k 0, top-p 1, stop at EOS (docs/method.md, section 4). The record goes to
benchmarks/results/DATE-<preset>-onpolicy.md.

`--answer-tokens` (the gpu preset's default `references`) raises a random-init student's EOS
logit so that its answers end after a realistic mean length, as in benchmarks/generation.py:
without it every answer runs to the token limit and one stream cannot gain over the per-batch way.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "cpu": {"model": "smollm2-135m-instruct", "micro_batches": 4, "batch": 4, "max_new_tokens": 96, "repeats": 2},
    "gpu": {
        "model": "random:gpt2",
        "micro_batches": 4,
        "batch": 16,
        "max_new_tokens": 256,
        "repeats": 2,
        "answer_tokens": "references",
    },
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--model", default=None, help="student model spec (default: the preset's)")
    p.add_argument("--micro-batches", type=int, default=None, help="on-policy micro-batches in the step")
    p.add_argument("--batch", type=int, default=None, help="rows per micro-batch")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None, help="steps timed (different prompts each)")
    p.add_argument(
        "--answer-tokens",
        default=None,
        help="raise the EOS logit so answers end after this many tokens on average (`references`: the prompts' "
        "mean reference length; 0: leave the model as it is; default: the preset's)",
    )
    p.add_argument("--record", default=None, help="markdown record path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    import torch

    from benchmarks.common import header, save_record
    from srd.data.sources import load_examples
    from srd.data.tokenize import encode_example
    from srd.generation.decode import row_seeds
    from srd.models import load_model, load_tokenizer
    from srd.train.onpolicy import sample_responses

    cfg = dict(PRESETS[args.preset])
    for key in ("model", "micro_batches", "batch", "max_new_tokens", "repeats"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokenizer = load_tokenizer(cfg["model"])
    with torch.device(device):
        model = load_model(cfg["model"], dtype=dtype).to(device).eval()
    m, b = cfg["micro_batches"], cfg["batch"]
    n = m * b * cfg["repeats"]
    examples = load_examples("dolly", limit=n)
    enc = [encode_example(tokenizer, ex, fmt="alpaca", max_prompt_len=256, max_len=512) for ex in examples]
    kw = dict(max_new_tokens=cfg["max_new_tokens"], temperature=1.0, top_k=0, top_p=1.0, max_len=10_000)
    length_note = ""
    target = args.answer_tokens if args.answer_tokens is not None else cfg.get("answer_tokens")
    if target not in (None, "0", 0):
        from benchmarks.generation import shorten_answers
        from srd.data.prompts import encode_prompt

        prompts = [encode_prompt(tokenizer, ex, "alpaca", 256) for ex in examples]
        length_note = " " + shorten_answers(model, tokenizer, examples, prompts, target, cfg["max_new_tokens"])
    sample_responses(model, tokenizer, enc[:b], seeds=row_seeds(0, b), **kw)  # warm-up

    def per_micro_batch(groups, seeds):
        return [e for grp, s in zip(groups, seeds) for e in sample_responses(model, tokenizer, grp, seeds=s, **kw)]

    def one_stream(groups, seeds):
        rows, flat = [e for g in groups for e in g], [x for s in seeds for x in s]
        return sample_responses(model, tokenizer, rows, seeds=flat, batch_size=len(rows), **kw)

    def timed(fn, *fn_args):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn(*fn_args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    results = {"per micro-batch": [0.0, []], "one stream per step": [0.0, []]}
    for r in range(cfg["repeats"]):
        step = enc[r * m * b : (r + 1) * m * b]
        groups = [step[g * b : (g + 1) * b] for g in range(m)]
        seeds = [row_seeds(1000 * r + g, b) for g in range(m)]
        for name, fn in (("per micro-batch", per_micro_batch), ("one stream per step", one_stream)):
            out, secs = timed(fn, groups, seeds)
            results[name][0] += secs
            results[name][1] += out
        print(f"step {r + 1}: " + ", ".join(f"{k} {v[0]:.1f} s" for k, v in results.items()), flush=True)

    def new_tokens(rows):  # the sampled tokens are the targets
        return sum(t != -100 for e in rows for t in e.labels)

    base = results["per micro-batch"][0]
    lines = header(f"On-policy sampling, preset `{args.preset}`") + [
        f"Precision {dtype}. Student `{cfg['model']}`; {cfg['repeats']} steps of {m} on-policy micro-batches x {b} "
        f"Dolly prompts (Alpaca template); sampling at temperature 1, top-k 0, top-p 1, at most "
        f"{cfg['max_new_tokens']} new tokens, stop at EOS; the same seed per row both ways." + length_note,
        "",
        "| sampling | wall time (s) | sampled tokens | tokens/s | speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, (secs, rows) in results.items():
        tokens = new_tokens(rows)
        lines.append(f"| {name} | {secs:.1f} | {tokens} | {tokens / secs:.1f} | {base / secs:.2f}x |")
    a, c = results["per micro-batch"][1], results["one stream per step"][1]
    same = sum(x.input_ids == y.input_ids for x, y in zip(a, c))
    lines += ["", f"{same}/{len(a)} sampled answers identical between the two ways."]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "onpolicy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
