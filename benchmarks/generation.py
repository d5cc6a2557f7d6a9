"""Generation throughput: srd's decode loop against plain `model.generate`, same prompts and settings.

    python benchmarks/generation.py --preset cpu     # bundled SmolLM2-135M, 64 DollyEval prompts
    python benchmarks/generation.py --preset gpu     # random-init GPT-2 124M shapes, 1,024 Dolly prompts

Backends: `hf` (plain `generate`), `loop` (srd's decode loop with continuous batching:
finished rows leave the batch and waiting prompts join it), `static` (`generate` with one
static KV cache size and batch size for the whole call, compiled by transformers on a GPU;
pass --backends hf loop static), `static-compiled` (the same, compiled on a CPU too:
transformers' CompileConfig told to compile on every device, torch.compile's inductor; the
compilation happens in the warm-up call and is reported apart), `loop-unpacked` (the decode loop
with the weights as they are: on a CPU in float32, or in bfloat16 where the CPU has bf16 in
hardware, every backend otherwise decodes through linear layers packed once for oneDNN,
srd.generation.packed). All take the same length-sorted,
left-padded prompts (at most `batch` decoding together) and the same rules (stop at EOS and `###`, no-repeat n-grams,
greedy or sampling). Reported: wall time, generated
tokens per second, the speed-up, and for greedy decoding how many answers are identical
(finished rows leaving the batch changes matmul shapes, so a near-tie can rarely flip).
The record goes to benchmarks/results/DATE-<preset>-generation.md.

`--dtypes float32 bfloat16` decodes with the weights in each precision in turn (what
`generation.dtype` chooses for reflection and evaluation), and says how many greedy answers the
two share; every row also gives the answers' ROUGE-L against the references.

Answer lengths of a random-init model (`--answer-tokens`, the gpu preset's default
`references`): such a model almost never samples EOS, so every answer would run to the token
limit, and nothing could show what letting finished rows go is worth. The model's EOS logit is
raised by a constant (a bias on its output layer) so that a sampled answer ends after a
geometric number of tokens whose mean, cut at the token limit, is the prompts' mean reference
answer length (or the given number). Every backend decodes the same biased model; the record
gives the realised mean. `--answer-tokens 0` leaves the model as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "cpu": {
        "model": "smollm2-135m-instruct",
        "data": "dolly-eval",
        "limit": 64,
        "batch_sizes": [16],
        "max_new_tokens": 128,
        "do_sample": False,
        "no_repeat_ngram_size": 6,
    },
    "gpu": {
        "model": "random:gpt2",
        "data": "dolly",
        "limit": 1024,
        "batch_sizes": [64, 256],
        "max_new_tokens": 256,
        "do_sample": True,
        "no_repeat_ngram_size": 0,
        "answer_tokens": "references",
    },
}


def eos_hazard(mean_tokens: float, max_new_tokens: int) -> float:
    """The per-token EOS probability h whose answer length min(Geometric(h), max_new_tokens) has
    mean `mean_tokens`: E = (1 - h) (1 - (1 - h)^M) / h, solved by bisection."""
    if not 0 < mean_tokens < max_new_tokens:
        raise ValueError(f"--answer-tokens must be between 0 and max_new_tokens ({max_new_tokens}), got {mean_tokens}")
    lo, hi = 1e-9, 1.0
    for _ in range(100):
        h = (lo + hi) / 2
        if (1 - h) * (1 - (1 - h) ** max_new_tokens) / h > mean_tokens:
            lo = h
        else:
            hi = h
    return (lo + hi) / 2


def raise_eos_logit(model, tokenizer, prompts, hazard: float) -> float:
    """Add a bias to the model's EOS logit so that a sampled token is EOS with probability
    about `hazard` (calibrated on the last-position logits of up to 16 prompts); the bias."""
    import math

    import torch

    from srd.data.tokenize import pad_id
    from srd.generation.decode import _left_pad

    eos = tokenizer.eos_token_id
    head = model.get_output_embeddings()
    device = head.weight.device
    ids, mask = _left_pad(prompts[:16], pad_id(tokenizer))
    with torch.no_grad():
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, -1].float()
    others = logits.clone()
    others[:, eos] = float("-inf")
    bias = float((others.logsumexp(-1) - logits[:, eos]).mean()) + math.log(hazard / (1 - hazard))
    b = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=device)
    b[eos] = bias
    head.bias = torch.nn.Parameter(b, requires_grad=False)
    return bias


def shorten_answers(model, tokenizer, examples, prompts, target, limit: int) -> str:
    """`--answer-tokens`: raise the model's EOS logit so that sampled answers end after `target`
    tokens on average (`references`: the examples' mean reference length, cut at `limit`); the
    sentence that says so in a record."""
    if target == "references":
        refs = [min(len(tokenizer(ex.output, add_special_tokens=False)["input_ids"]), limit) for ex in examples]
        mean_tokens, source = sum(refs) / len(refs), "the prompts' mean reference answer length"
        if mean_tokens > limit - 1:
            return f"Answer lengths: the references reach the {limit}-token limit, so the model is unchanged. "
    else:
        mean_tokens, source = float(target), "--answer-tokens"
    hazard = eos_hazard(mean_tokens, limit)
    bias = raise_eos_logit(model, tokenizer, prompts, hazard)
    return (
        f"Answer lengths: the EOS logit raised by {bias:.2f} (an output-layer bias), for an EOS probability "
        f"of {hazard:.4f} per token: a mean of {mean_tokens:.1f} answer tokens cut at {limit} ({source}). "
    )


def _profiler(device: str):
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else []))


def _profile_lines(prof, what: str, wall: float, device: str, top: int = 10) -> list[str]:
    """Where a profiled call's time went: torch operators' self time on the host (on a GPU mostly
    kernel launches; the rest of the wall time is Python and the framework around them) and, on a
    GPU, the kernels' time on the device, which shows whether decoding waits on the host."""
    events = [e for e in prof.key_averages() if e.key != "ProfilerStep*"]
    host = sum(e.self_cpu_time_total for e in events) / 1e6
    lines = [
        "",
        f"## Profile: {what}",
        "",
        f"Wall time under the profiler {wall:.2f} s; torch operators' own host time {host:.2f} s "
        f"({100 * host / wall:.0f}%); the rest ({wall - host:.2f} s) is Python and the framework around them.",
    ]
    tables = [("host", lambda e: e.self_cpu_time_total)]
    if device == "cuda":
        busy = sum(e.self_device_time_total for e in events) / 1e6
        lines[-1] += f" Device kernels {busy:.2f} s ({100 * busy / wall:.0f}% of the wall time)."
        tables.append(("device", lambda e: e.self_device_time_total))
    for name, own in tables:
        ranked = sorted((e for e in events if own(e) > 0), key=own, reverse=True)[:top]
        lines += [
            "",
            f"| operator (self {name} time) | s | share of the wall time | calls |",
            "|---|---|---|---|",
            *(f"| `{e.key}` | {own(e) / 1e6:.3f} | {100 * own(e) / 1e6 / wall:.1f}% | {e.count} |" for e in ranked),
        ]
    return lines


def read_bandwidth(device: str) -> float:
    """This machine's memory read bandwidth in bytes/s: the best of 5 sums of a 512 MiB bf16
    tensor (with the run's threads), after one warm-up read."""
    import torch

    x = torch.ones(256 * 2**20, dtype=torch.bfloat16, device=device)
    best = float("inf")
    for i in range(6):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        x.sum()
        if device == "cuda":
            torch.cuda.synchronize()
        if i:
            best = min(best, time.perf_counter() - t)
    return x.numel() * x.element_size() / best


def step_weight_bytes(model, dtype) -> int:
    """Bytes of weights one decode step reads: every parameter once, in `dtype` (floating ones),
    except an input embedding that is not also the output layer (a step gathers only its rows)."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    skip = set() if head is not None and head.weight is emb.weight else {id(emb.weight)}
    return sum(
        p.numel() * (dtype.itemsize if p.is_floating_point() else p.element_size())
        for p in model.parameters()
        if id(p) not in skip
    )


@contextlib.contextmanager
def _env(name: str, value: str | None):
    """The environment variable `name` set to `value` for the block (None: left as it is)."""
    import os

    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before


@contextlib.contextmanager
def _compiled_everywhere(model, on: bool):
    """transformers compiles `generate`'s static-cache forward on GPUs only; `on`: on any device."""
    if not on:
        yield
        return
    from transformers import CompileConfig

    config = CompileConfig()
    config._compile_all_devices = True  # transformers' own switch for devices other than GPUs / TPUs
    before = model.generation_config.compile_config
    model.generation_config.compile_config = config
    try:
        yield
    finally:
        model.generation_config.compile_config = before


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--model", default=None, help="model spec (default: the preset's)")
    p.add_argument("--limit", type=int, default=None, help="number of prompts (default: the preset's)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument(
        "--backends",
        nargs="+",
        default=["hf", "loop"],
        choices=["hf", "loop", "loop-unpacked", "static", "static-compiled", "vllm"],
    )
    p.add_argument(
        "--answer-tokens",
        default=None,
        help="sampling: raise the EOS logit so answers end after this many tokens on average (`references`: "
        "the prompts' mean reference length; 0: leave the model as it is; default: the preset's)",
    )
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        type=lambda v: {"bf16": "bfloat16", "fp32": "float32"}.get(v, v),  # either spelling
        choices=["float32", "bfloat16"],
        help="weights' precisions to decode with, each in turn (default: bfloat16 on a GPU, float32 on a CPU)",
    )
    p.add_argument("--record", default=None, help="markdown record path (default benchmarks/results/...)")
    p.add_argument(
        "--phases",
        action="store_true",
        help="time the decode loop's forward passes by kind (prefill of joining prompts, decode steps) and "
        "compare the decode steps with the time to read the weights once per step at this machine's measured "
        "read bandwidth; "
        "the timing itself synchronises the device after every forward",
    )
    p.add_argument(
        "--profile",
        action="store_true",
        help="run every backend's timed call under torch.profiler and record where its time goes: the "
        "operators with the most self time on the host and on the device, and how much of the wall time "
        "the device was busy (the profiler slows the calls down: time them without it)",
    )
    args = p.parse_args(argv)

    import torch

    import srd.generation.decode as gen_mod
    from benchmarks.common import Stopped, header, save_record, sigterm_stops
    from srd.data.prompts import encode_prompt
    from srd.data.sources import load_examples
    from srd.generation.decode import generate_responses
    from srd.metrics.text import rouge_l
    from srd.models import load_model, load_tokenizer
    from srd.models.load import cast_for_inference, dtype_from_name

    cfg = dict(PRESETS[args.preset])
    for key in ("model", "limit", "batch_sizes", "max_new_tokens"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = args.dtypes or ["bfloat16" if device == "cuda" else "float32"]
    # loaded once, in float32 when that is asked for (a bf16 copy is exact, the way back is not)
    dtype = torch.float32 if "float32" in dtypes else dtype_from_name(dtypes[0])
    tokenizer = load_tokenizer(cfg["model"])
    with torch.device(device):  # random-init weights are drawn on the GPU
        model = load_model(cfg["model"], dtype=dtype).to(device).eval()
    examples = load_examples(cfg["data"], limit=cfg["limit"])
    prompts = [encode_prompt(tokenizer, ex, "alpaca", 256) for ex in examples]
    length_note = ""
    target = args.answer_tokens if args.answer_tokens is not None else cfg.get("answer_tokens")
    if target not in (None, "0", 0):
        if not cfg["do_sample"]:
            raise SystemExit(
                "--answer-tokens needs a sampling preset (greedy answers of a raised-EOS model are all empty)"
            )
        length_note = shorten_answers(model, tokenizer, examples, prompts, target, cfg["max_new_tokens"])
    rows, answers, phase_lines, profile_lines = [], {}, [], []
    bandwidth = read_bandwidth(device) if args.phases else 0.0
    runs = [(bs, name, backend) for name in dtypes for bs in cfg["batch_sizes"] for backend in args.backends]

    def measure(bs: int, name: str, backend: str) -> None:
        """One backend at one batch size and precision: its row (and profile / phase lines)."""
        label = backend if len(dtypes) == 1 else f"{backend} {name}"
        compiled, unpacked = backend == "static-compiled", backend == "loop-unpacked"
        key = backend
        backend = "static" if compiled else "loop" if unpacked else backend
        with (
            cast_for_inference(model, dtype_from_name(name)),
            _compiled_everywhere(model, compiled),
            _env("SRD_CPU_PACKED", "0" if unpacked else None),  # the weights as they are (srd.generation.packed)
        ):
            # warm-up (allocator, kernels) on one small batch; static: on the longest prompts with the full
            # length, so the warm-up compiles the graph (cache size, batch size) that the timed run uses
            if backend == "static":
                longest = sorted(prompts, key=len, reverse=True)[:bs]
                tw = time.perf_counter()
                generate_responses(
                    model, tokenizer, longest, max_new_tokens=cfg["max_new_tokens"], batch_size=bs, backend=backend
                )
                if compiled:
                    phase_lines.append(
                        f"Batch {bs}, {label}: the warm-up call (one batch of the longest prompts, compiling the "
                        f"graph) took {time.perf_counter() - tw:.1f} s, not in the row's wall time."
                    )
            else:
                generate_responses(model, tokenizer, prompts[:bs], max_new_tokens=8, batch_size=bs, backend=backend)
            if device == "cuda":
                torch.cuda.synchronize()
            phases = {"prefill": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # calls, seconds, rows (or tokens)
            real_step = gen_mod.step_logits

            def timed_step(model_, real_step=real_step, phases=phases, **inputs):
                if device == "cuda":
                    torch.cuda.synchronize()
                t = time.perf_counter()
                out = real_step(model_, **inputs)
                if device == "cuda":
                    torch.cuda.synchronize()
                ids = inputs["input_ids"]
                kind = phases["decode" if ids.shape[1] == 1 else "prefill"]
                kind[0] += 1
                kind[1] += time.perf_counter() - t
                kind[2] += ids.shape[0] if ids.shape[1] == 1 else int(inputs["attention_mask"].sum())
                return out

            if args.phases and backend == "loop":
                gen_mod.step_logits = timed_step
            profiler = _profiler(device) if args.profile else contextlib.nullcontext()
            t0 = time.perf_counter()
            with profiler as prof:
                texts = generate_responses(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=cfg["max_new_tokens"],
                    batch_size=bs,
                    do_sample=cfg["do_sample"],
                    no_repeat_ngram_size=cfg["no_repeat_ngram_size"],
                    stop_strings=["###"],
                    seed=10 if cfg["do_sample"] else None,
                    backend=backend,
                    progress=True,
                    desc=f"{label} batch {bs}",
                )
                if device == "cuda":
                    torch.cuda.synchronize()
                wall = time.perf_counter() - t0  # before the profiler (if any) processes its events
            gen_mod.step_logits = real_step
            if args.profile:
                profile_lines.extend(_profile_lines(prof, f"batch {bs}, {label}", wall, device))
            if args.phases and backend == "loop":
                (pn, ps, pt), (dn, ds, dr) = phases["prefill"], phases["decode"]
                weights = step_weight_bytes(model, dtype_from_name(name))
                bound = dn * weights / bandwidth  # every decode step reads the weights once
                phase_lines.append(
                    f"Batch {bs}, {label}, forward passes by kind: prefill {ps:.1f} s in {pn} calls ({pt} prompt "
                    f"tokens); decode {ds:.1f} s in {dn} steps (mean {dr / max(dn, 1):.1f} live rows, "
                    f"{1e3 * ds / max(dn, 1):.1f} ms a step); the rest of "
                    f"the {wall:.1f} s wall time (sampling, stop checks, cache joins) {wall - ps - ds:.1f} s. "
                    f"Weight-reading limit: a step reads {weights / 1e6:.0f} MB of weights, "
                    f"{1e3 * weights / bandwidth:.1f} ms at this machine's {bandwidth / 1e9:.1f} GB/s, "
                    "so the decode steps ran at "
                    f"{100 * bound / max(ds, 1e-9):.0f}% of that limit ({bound:.1f} s of {ds:.1f} s)."
                )
            n_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
            answers[(bs, key, name)] = texts
            score = sum(rouge_l(t, ex.references) for t, ex in zip(texts, examples)) / len(texts)  # x100 already
            rows.append((bs, label, backend == "hf" and name == dtypes[0], wall, n_tokens, score))
            print(f"batch {bs} {label}: {wall:.1f} s, {n_tokens} answer tokens, {n_tokens / wall:.1f} tok/s")

    stopped: list[str] = []
    with sigterm_stops():
        try:
            for run in runs:
                measure(*run)
        except Stopped:  # over the caller's time limit: record the finished rows, name the rest
            stopped = [f"batch {bs} {b}" + f" {n}" * (len(dtypes) > 1) for bs, n, b in runs[len(rows) :]]
            print(f"stopped (SIGTERM); not run: {', '.join(stopped)}", file=sys.stderr)

    has_ref = "hf" in args.backends  # no `hf` row: no speed-up column
    ref = "hf" if len(dtypes) == 1 else f"hf {dtypes[0]}"
    lines = header(f"Generation benchmark, preset `{args.preset}`") + [
        f"Weights in {' and '.join(dtypes)}. Model `{cfg['model']}`; {len(prompts)} prompts from `{cfg['data']}` "
        "(Alpaca template); "
        f"{'sampling (T = 1, seed 10)' if cfg['do_sample'] else 'greedy'}, max {cfg['max_new_tokens']} new tokens, "
        f"no_repeat_ngram_size {cfg['no_repeat_ngram_size']}, stop at EOS and `###`. Tokens = the answers' tokens "
        "after cutting at the stop string (what both backends keep). " + length_note,
        "",
        "| batch | backend | wall time (s) | answer tokens | mean per answer | tokens/s "
        + f"| speed-up vs {ref} (tokens/s) " * has_ref
        + "| ROUGE-L vs references |",
        "|---|---|---|---|---|---|---|" + "---|" * has_ref,
    ]
    # tokens/s, not wall time: sampled answers differ between backends (hf / static draw from torch's generator)
    base = {bs: (wall, n) for bs, _, is_base, wall, n, _ in rows if is_base}
    for bs, label, _, wall, n, score in rows:
        speed = "-"
        if bs in base:  # (no answer tokens at all, as from a tiny test model: the wall-time ratio)
            ratio = (n / wall) / (base[bs][1] / base[bs][0]) if base[bs][1] else base[bs][0] / wall
            speed = f"{ratio:.2f}x"
        lines.append(
            f"| {bs} | {label} | {wall:.1f} | {n} | {n / len(prompts):.1f} | {n / wall:.1f} |"
            + f" {speed} |" * has_ref
            + f" {score:.2f} |"
        )
    if not cfg["do_sample"]:
        for bs, name in ((bs, name) for name in dtypes for bs in cfg["batch_sizes"]):
            a = answers.get((bs, "hf", name))
            for other in ("loop", "static"):
                b = answers.get((bs, other, name))
                if a and b:
                    same = sum(x == y for x, y in zip(a, b))
                    at = "" if len(dtypes) == 1 else f" ({name})"
                    lines += ["", f"Batch {bs}: {same}/{len(a)} greedy answers identical between hf and {other}{at}."]
            a, b = answers.get((bs, "loop", name)), answers.get((bs, "loop-unpacked", name))
            if a and b:
                same = sum(x == y for x, y in zip(a, b))
                at = "" if len(dtypes) == 1 else f" ({name})"
                lines += [
                    "",
                    f"Batch {bs}: {same}/{len(a)} greedy answers identical between loop and loop-unpacked{at}.",
                ]
        for bs, backend in ((bs, b) for bs in cfg["batch_sizes"] for b in args.backends):
            a, *others = (answers.get((bs, backend, name)) for name in dtypes)
            for name, b in zip(dtypes[1:], others):
                same = sum(x == y for x, y in zip(a, b))
                lines += [
                    "",
                    f"Batch {bs}, {backend}: {same}/{len(a)} greedy answers identical between {dtypes[0]} and {name}.",
                ]
    if phase_lines:
        lines += ["", *phase_lines]
    if stopped:
        lines += ["", f"Stopped by SIGTERM (a time limit) before: {', '.join(stopped)}."]
    if profile_lines:
        lines += [
            "",
            "The calls above ran under torch.profiler, which slows them: their times are not comparable "
            "with unprofiled runs.",
            *profile_lines,
        ]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "generation")
    return 0


if __name__ == "__main__":
    sys.exit(main())
