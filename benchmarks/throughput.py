"""KD step throughput: srd's step against a hand-written Hugging Face KD step, same models and batch.

    python benchmarks/throughput.py --preset cpu    # bundled SmolLM2-135M teacher -> healed 20-layer student, 8 x 256
    python benchmarks/throughput.py --preset gpu    # random-init GPT-2 1.5B -> 124M shapes, 16 x 512, bf16

Each implementation runs in its own subprocess (clean peak memory), on the same batch of
real Dolly text packed to the full length with the first quarter of every row masked as the
prompt, forward KL (tau 1, no CE term), AdamW:

  naive  the hand-written loop: full teacher and student logits, float32 log-softmax over the
         whole vocabulary for every position, masked mean of KL(p || q)
  srd       srd's step: response positions only, LM heads + log-softmax + divergence in chunks
            inside activation checkpoints (srd.train.step.DistillModule, srd.losses.kd;
            loss.recompute_chunks=true, what `auto` picks on a GPU)
  srd-keep  the same without recomputing the chunks in backward (loss.recompute_chunks=false,
            what `auto` picks on a CPU)
  srd-compile       srd with every transformer block of both models compiled (train.compile=true:
                    `nn.Module.compile`, torch.compile's default mode): does compiling pay here?
  srd-keep-compile  srd-keep, compiled the same way
  srd-keep[-compile]-lp16, srd-keep[-compile]-lp32  srd-keep (compiled) with
            loss.recompute_log_probs=true / false: under bf16, the heads' bf16 logits and one
            value per row kept for backward and the float32 log-probabilities rebuilt there, or
            float32 log-probabilities kept (the other rows follow `auto`: true on a GPU, false
            on a CPU); not in the default list
  srd-cache, srd-keep-cache  srd / srd-keep trained from the teacher store's top-64 rows
            (loss.teacher_top_k=64): the teacher's buckets for the batch are computed once before
            the timed steps, in the store's form (uint16 ids, float16 logits; as the store is built
            once and reused over SRD's epochs; the build time is reported apart), so a step runs
            no teacher forward
  trl       TRL's GKDTrainer (trl.experimental.gkd) run through its own `train()` loop, off-policy
            (lmbda=0) forward KL (beta=0), temperature 1, AdamW, no gradient clipping, fed the same
            batch by a collator; timed per optimizer step by a callback. Needs `pip install trl`
            (pinned in requirements.lock; skipped with a note when it is not installed)

`--dtypes float32 bf16` runs every implementation at each precision (bf16 = the teacher's
weights in bf16 and the student's step under bf16 autocast, its weights and AdamW in float32,
what `train.precision=bf16` does; on a CPU only where it has native bf16 matmuls, e.g. AVX512-BF16
or AMX) and compares every row with the hand-written step at the first precision and at its own.

`--rounds 3` runs the whole list three times, one implementation after another in each round,
and reports the median over all rounds' steps with each round's median: on a shared or
thermally variable machine the spread between rounds is the noise to read a ratio against.
`--against DIR` also runs every srd implementation with the srd package of another checkout
(`git worktree add ../srd-before HEAD~1`), interleaved with this one's, for a before/after
comparison in one record.

Reported: median step time after warm-up, tokens/s (all B x T tokens), peak memory (GPU
allocator peak, or the process's peak RSS on a CPU) and the ratios. The record goes to
benchmarks/results/DATE-<preset>-throughput.md.

    python benchmarks/throughput.py --preset cpu --profile --impls srd-keep naive

profiles the same steps with torch.profiler instead: time per step in each phase (teacher
forward, student forward + loss, backward, optimizer) and the operators that take it, per
implementation, recorded in benchmarks/results/DATE-<preset>-profile.md.

    python benchmarks/throughput.py --preset cpu --loss-only

times the forward-KL loss alone (forward + backward over one 1,024-position chunk of
vocabulary-sized logits): srd's forward_kl, whose backward is written by hand, against the same
formula differentiated by autograd; CE + forward KL as two losses against forward_kl_with_ce,
which shares one log-softmax; the same from bf16 logits, float32 log-probs kept or the bf16 logits
(loss.recompute_log_probs); and the teacher-cache path, the student's buckets by autograd against
student_buckets_with_ce; recorded in benchmarks/results/DATE-<preset>-loss.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PRESETS = {
    "cpu": {
        "teacher": "smollm2-135m-instruct",
        "student": "runs/students/smollm2-20l-healed",
        "batch": 8,
        "seq": 256,
        "steps": 4,
        "dtype": "float32",
    },
    "gpu": {
        "teacher": "random:gpt2-xl",
        "student": "random:gpt2",
        "batch": 16,
        "seq": 512,
        "steps": 10,
        "dtype": "bf16",
    },
}


IMPLS = ["naive", "srd", "srd-keep", "srd-compile", "srd-keep-compile", "srd-cache", "srd-keep-cache", "trl"]
VARIANTS = ["srd-keep-lp16", "srd-keep-lp32", "srd-keep-compile-lp16", "srd-keep-compile-lp32"]  # on request
CACHE_TOP_K = 64


def _batch(tokenizer, batch: int, seq: int):
    """B rows of exactly `seq` tokens of real Dolly text; the first quarter of each is the masked prompt."""
    import torch

    from srd.data.sources import load_examples
    from srd.data.tokenize import IGNORE_INDEX

    text = " ".join(f"{ex.instruction} {ex.input} {ex.target}" for ex in load_examples("dolly", limit=400))
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    rows = [ids[i * seq : (i + 1) * seq] for i in range(batch)]
    input_ids = torch.tensor(rows, dtype=torch.long)
    labels = input_ids.clone()
    labels[:, : seq // 4] = IGNORE_INDEX
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _peak_memory_gib(device: str) -> float:
    import resource

    import torch

    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB


PHASES = ["teacher forward", "student forward + loss", "backward", "optimizer"]


def run_impl(impl: str, cfg: dict, profile: bool = False) -> dict:
    """One implementation, in this process: returns step times and peak memory (or, with
    `profile`, where a step's time goes)."""
    import torch
    import torch.nn.functional as F
    from torch.profiler import record_function

    from srd.losses.kd import combine
    from srd.models import load_model, load_tokenizer
    from srd.models.features import compile_blocks, teacher_features
    from srd.train.step import DistillModule

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = cfg["dtype"] == "bf16"  # bf16 teacher weights + bf16 autocast of the student (fp32 master weights)
    tokenizer = load_tokenizer(cfg["student"])
    with torch.device(device):  # random-init weights are drawn on the GPU: seconds, not a minute
        teacher = load_model(cfg["teacher"], dtype=torch.bfloat16 if bf16 else torch.float32).to(device).eval()
        student = load_model(cfg["student"]).to(device).train()
    teacher.requires_grad_(False)
    batch = {k: v.to(device) for k, v in _batch(tokenizer, cfg["batch"], cfg["seq"]).items()}
    vocab = len(tokenizer)
    fused = device == "cuda"
    if impl.startswith("srd"):
        parts = impl.split("-")
        # loss.recompute_log_probs: `auto` (on a GPU) unless the row names it
        lean = True if "lp16" in parts else False if "lp32" in parts else device == "cuda"
        extra = {}
        if "recompute_log_probs" in inspect.signature(DistillModule).parameters:
            extra["recompute_log_probs"] = lean
        elif "lp16" in parts:  # --against an older checkout
            raise SystemExit(f"{impl}: the srd package in use has no loss.recompute_log_probs (an older checkout?)")
        module = DistillModule(
            student,
            divergence="fkl",
            tau=1.0,
            beta=None,
            chunk_size=1024,
            vocab_size=vocab,
            recompute="keep" not in parts,  # srd-keep: loss.recompute_chunks=false
            **extra,
        )
        if "compile" in parts:  # train.compile=true
            compile_blocks(teacher)
            compile_blocks(student)
        params = module.parameters()
    else:
        params = student.parameters()
    if impl == "trl":
        return _run_trl(cfg, teacher, student, tokenizer, batch, device, bf16)
    opt = torch.optim.AdamW(params, lr=1e-5, fused=fused or None)
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=bf16)
    cached, cache_s = None, None
    if impl.endswith("-cache"):  # what srd.train.teacher_store stores for this batch, built once
        import numpy as np

        from srd.losses.kd import SparseTeacher
        from srd.train.teacher_store import compress, feature_buckets

        t0 = time.perf_counter()
        with torch.no_grad(), autocast:
            feats, head = teacher_features(teacher, batch)
            # as the store serves them: uint16 ids and float16 logits, read back as int64 / float32
            ids, logits = compress(*feature_buckets(feats, head, vocab, CACHE_TOP_K), vocab)
            cached = SparseTeacher(
                torch.from_numpy(ids.astype(np.int64)).to(device), torch.from_numpy(logits).float().to(device)
            )
        if device == "cuda":
            torch.cuda.synchronize()
        cache_s = time.perf_counter() - t0
        del feats

    def step() -> None:
        with autocast:
            if impl == "naive":
                with record_function(PHASES[0]), torch.no_grad():
                    t_logits = teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                with record_function(PHASES[1]):
                    s_logits = student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                    t_logp = F.log_softmax(t_logits[:, :-1, :vocab].float(), dim=-1)
                    s_logp = F.log_softmax(s_logits[:, :-1, :vocab].float(), dim=-1)
                    kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)
                    mask = batch["labels"][:, 1:] != -100
                    loss = kl[mask].mean()
            else:
                with record_function(PHASES[0]):
                    t_in, t_head = (cached, None) if cached is not None else teacher_features(teacher, batch)
                with record_function(PHASES[1]):
                    sums = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_in, t_head)
                    loss = combine(sums, alpha=0.0, kd_scale=1.0, denominator=float(sums.n_tokens))
        with record_function(PHASES[2]):
            loss.backward()
        with record_function(PHASES[3]):
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()  # warm-up
    if profile:
        return {"impl": impl, "device": device, **_profile(step, cfg["steps"], device)}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(cfg["steps"]):
        t0 = time.perf_counter()
        step()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    out = {"impl": impl, "step_s": times, "peak_gib": _peak_memory_gib(device), "device": device}
    if device == "cpu":
        out["step_tensors_gib"] = _cpu_step_tensor_peak(step)
    return {**out, "cache_build_s": cache_s} if cache_s is not None else out


def _cpu_step_tensor_peak(step) -> float:
    """GiB: the largest total of tensor memory that one more step allocated and still held at any
    moment (torch's CPU allocator as torch.profiler reports it, counting from the step's start:
    the weights, AdamW's state and other memory from before are not in it). On a CPU the peak RSS
    is no measure of this once freed blocks stay in the process (srd.utils.tune_cpu_allocator);
    a GPU's allocator peak is this plus the memory held before the step."""
    import json
    import tempfile

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        trace = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(trace))
        events = json.loads(trace.read_text())["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events if e.get("name") == "[memory]"]
    return max(totals, default=0) / 2**30


def _profile(step, steps: int, device: str, top: int = 12) -> dict:
    """Per step: wall time, each phase's time, and the operators with the most self time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    cuda = device == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
            if cuda:
                torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps
    events = prof.key_averages()
    # on a GPU the time that counts is the kernels' (device) time; on a CPU the thread's time
    total = (lambda e: e.device_time_total) if cuda else (lambda e: e.cpu_time_total)
    own = (lambda e: e.self_device_time_total) if cuda else (lambda e: e.self_cpu_time_total)
    phases = {e.key: total(e) / 1e6 / steps for e in events if e.key in PHASES}
    ops = sorted((e for e in events if e.key not in PHASES and own(e) > 0), key=own, reverse=True)[:top]
    return {
        "wall_s": wall,
        "clock": "GPU kernel time" if cuda else "CPU time",
        "phases": [[name, phases.get(name, 0.0)] for name in PHASES],
        "ops": [[e.key, own(e) / 1e6 / steps, e.count / steps] for e in ops],
    }


def profile_record(args: argparse.Namespace, cfg: dict, results: list[dict]) -> str:
    from benchmarks.common import header

    lines = header(f"KD step profile, preset `{args.preset}`") + [
        f"Teacher `{cfg['teacher']}`, student `{cfg['student']}`, batch {cfg['batch']} x {cfg['seq']} tokens, "
        f"{' and '.join(sorted({r['dtype'] for r in results}))}, forward KL, AdamW; torch.profiler over "
        f"{cfg['steps']} steps after 1 warm-up "
        "(the profiler itself adds a little time). Times are per step.",
        "",
    ]
    for r in results:
        wall = r["wall_s"]
        lines += [
            f"## {r['label']}: {wall:.3f} s per step under the profiler ({r['clock']})",
            "",
            "| phase | s/step | share of the step |",
            "|---|---|---|",
            *(f"| {name} | {sec:.3f} | {100 * sec / wall:.0f}% |" for name, sec in r["phases"]),
            "",
            "| operator (self time) | s/step | share of the step | calls/step |",
            "|---|---|---|---|",
            *(f"| `{name}` | {sec:.3f} | {100 * sec / wall:.1f}% | {calls:.0f} |" for name, sec, calls in r["ops"]),
            "",
        ]
    return "\n".join(lines)


def loss_benchmark(args: argparse.Namespace, chunk: int = 1024, vocab: int | None = None, repeats: int = 5) -> int:
    """Forward + backward of forward KL on one chunk: hand-written backward vs autograd; and of
    forward KL + CE (a loss with an SFT term): two losses vs one log-softmax for both."""
    import torch
    import torch.nn.functional as F

    from benchmarks.common import header, save_record
    from srd.losses.divergences import _kl, _log_probs, forward_kl, forward_kl_with_ce

    device = "cuda" if torch.cuda.is_available() else "cpu"
    vocab = vocab or {"cpu": 49152, "gpu": 50257}[args.preset]  # SmolLM2's or GPT-2's vocabulary
    g = torch.Generator().manual_seed(0)
    s = (3 * torch.randn(chunk, vocab, generator=g)).to(device)
    t = (3 * torch.randn(chunk, vocab, generator=g)).to(device)
    y = torch.randint(0, vocab, (chunk,), generator=g).to(device)

    def autograd_fkl(a, tau):
        return _kl(_log_probs(t, tau), _log_probs(a, tau)).sum()

    def srd_fkl(a, tau):
        return forward_kl(a, t, tau=tau).sum()

    def separate(a, tau):  # SRD's loss shape: alpha CE + (1 - alpha) KD, here 0.3 / 0.7
        return 0.3 * F.cross_entropy(a, y, reduction="sum") + 0.7 * forward_kl(a, t, tau=tau).sum()

    def fused(a, tau):
        kl, ce = forward_kl_with_ce(a, t, y, tau=tau)
        return 0.3 * ce.sum() + 0.7 * kl.sum()

    s16, t16 = s.bfloat16(), t.bfloat16()
    from srd.losses.kd import student_buckets_with_ce
    from srd.train.teacher_store import at_temperature, sparse_buckets

    def sparse_autograd(a, tau, cached):  # the cache path by autograd: gather, scatter, logsumexp
        lq = F.log_softmax(a.float() / tau, dim=-1)
        rest = lq.scatter(-1, cached.ids, float("-inf")).logsumexp(-1, keepdim=True).clamp_min(-80.0)
        buckets = torch.cat([lq.gather(-1, cached.ids), rest], dim=-1) * tau
        kd = forward_kl(buckets, cached.buckets, tau=tau).sum()
        return 0.3 * F.cross_entropy(a, y, reduction="sum") + 0.7 * kd

    def sparse_srd(a, tau, cached):  # what srd.losses.kd runs: student_buckets_with_ce
        buckets, ce = student_buckets_with_ce(a, cached.ids, y, tau)
        return 0.3 * ce.sum() + 0.7 * forward_kl(buckets, cached.buckets, tau=tau).sum()

    def fused_bf16(a, tau, upcast: bool):  # bf16 logits, as autocast's heads give them
        ins = (a.float(), t16.float()) if upcast else (a, t16)
        kl, ce = forward_kl_with_ce(*ins, y, tau=tau)
        return 0.3 * ce.sum() + 0.7 * kl.sum()

    def timed(fn, tau, source=s):
        ts, kept = [], {}

        def pack(x):  # what autograd keeps for backward, each storage once
            kept[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
            return x

        for _ in range(repeats + 1):  # the first is a warm-up
            a = source.clone().requires_grad_(True)
            kept.clear()
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
                out = fn(a, tau)
            out.backward()
            if device == "cuda":
                torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts[1:]), a.grad, sum(kept.values()) / 2**20  # MiB kept for backward

    rows, rows_ce, rows_16, rows_sparse = [], [], [], []
    for tau in (1.0, 2.0):
        (ta, ga, _), (tb, gb, _) = timed(autograd_fkl, tau), timed(srd_fkl, tau)
        rows.append((tau, ta, tb, (gb - ga).abs().max().item()))
        (tc, gc, _), (td, gd, _) = timed(separate, tau), timed(fused, tau)
        a64 = s.double().requires_grad_(True)  # the same loss in float64: each one's rounding error
        (0.3 * F.cross_entropy(a64, y, reduction="sum") + 0.7 * forward_kl(a64, t.double(), tau=tau).sum()).backward()
        err = [(grad.double() - a64.grad).abs().max().item() for grad in (gc, gd)]
        rows_ce.append((tau, tc, td, *err))
        del a64
        te, ge, kept_e = timed(lambda a, tau: fused_bf16(a, tau, True), tau, s16)
        tf, gf, kept_f = timed(lambda a, tau: fused_bf16(a, tau, False), tau, s16)
        rows_16.append((tau, te, tf, kept_e, kept_f, (ge.float() - gf.float()).abs().max().item()))
        cached = at_temperature(*sparse_buckets(t, min(64, vocab - 1), (tau,)), (tau,), tau)
        tg, gg, _ = timed(lambda a, tau, c=cached: sparse_autograd(a, tau, c), tau)
        th, gh, _ = timed(lambda a, tau, c=cached: sparse_srd(a, tau, c), tau)
        a64 = s.double().requires_grad_(True)
        c64 = type(cached)(cached.ids, cached.buckets.double())
        sparse_autograd(a64, tau, c64).backward()
        rows_sparse.append((tau, tg, th, *[(grad.double() - a64.grad).abs().max().item() for grad in (gg, gh)]))
        del a64
        print(
            f"tau {tau}: autograd {ta:.3f} s, srd {tb:.3f} s; KL + CE separate {tc:.3f} s, fused {td:.3f} s; "
            f"bf16 logits upcast {te:.3f} s ({kept_e:.0f} MiB kept), kept as bf16 {tf:.3f} s ({kept_f:.0f} MiB)"
        )
    lines = header(f"Forward-KL loss alone, preset `{args.preset}`") + [
        f"Forward + backward summed over {chunk} positions x {vocab:,} vocabulary logits (float32, random, "
        f"on `{device}`), median of {repeats} after one warm-up.",
        "",
        "KL(p || q): srd's `forward_kl` (hand-written backward) against the same formula differentiated by autograd.",
        "",
        "| tau | autograd (s) | srd (s) | speed-up | max abs. gradient difference |",
        "|---|---|---|---|---|",
        *(f"| {tau:g} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {e:.1e} |" for tau, a, b, e in rows),
        "",
        "0.3 CE + 0.7 KL(p || q) (a loss with an SFT term, the shape of every srd step): `F.cross_entropy` "
        "+ `forward_kl` against `forward_kl_with_ce` (one log-softmax of the student for both, one gradient "
        "buffer; what `srd.losses.kd` runs for forward KL).",
        "",
        "| tau | separate (s) | fused (s) | speed-up | max abs. gradient error vs float64: separate / fused |",
        "|---|---|---|---|---|",
        *(f"| {tau:g} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {e1:.1e} / {e2:.1e} |" for tau, a, b, e1, e2 in rows_ce),
        "",
        "The same fused loss from bf16 logits (what bf16 autocast's language-model heads give): upcast to "
        "float32 first, so that float32 p and log q are kept for backward (`loss.recompute_log_probs=false`), "
        "against passing the bf16 logits, which are kept with one value per row and the float32 "
        "log-probabilities rebuilt from them in backward (`true`). Kept = the bytes autograd holds for "
        "backward (saved_tensors_hooks); the gradient difference is of the bf16 gradients.",
        "",
        "| tau | upcast first (s) | bf16 kept (s) | speed-up | kept MiB: upcast / bf16 | max abs. grad difference |",
        "|---|---|---|---|---|---|",
        *(
            f"| {tau:g} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {ka:.4g} / {kb:.4g} | {d:.1e} |"
            for tau, a, b, ka, kb, d in rows_16
        ),
        "",
        "The teacher-cache path (top-64 ids and buckets of the same teacher logits): 0.3 CE + 0.7 KL over the "
        "buckets, the student's buckets by autograd (gather, scatter, logsumexp, log-softmax, and "
        "`F.cross_entropy` apart) against `student_buckets_with_ce` (one log-softmax, hand-written backward).",
        "",
        "| tau | autograd (s) | srd (s) | speed-up | max abs. gradient error vs float64: autograd / srd |",
        "|---|---|---|---|---|",
        *(f"| {tau:g} | {a:.3f} | {b:.3f} | {a / b:.2f}x | {e1:.1e} / {e2:.1e} |" for tau, a, b, e1, e2 in rows_sparse),
    ]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "loss")
    return 0


def _run_trl(cfg: dict, teacher, student, tokenizer, batch: dict, device: str, bf16: bool) -> dict:
    """TRL's GKDTrainer at the same settings: its own train() loop over `steps + 1` copies of the batch."""
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.times: list[float] = []
            self.t0 = 0.0

        def on_step_begin(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            if len(self.times) == 1:  # the first step is the warm-up
                self.times.clear()
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            if device == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self.t0)

    rows = cfg["batch"]
    timer = StepTimer()
    with tempfile.TemporaryDirectory() as tmp:
        args = GKDConfig(
            output_dir=tmp,
            per_device_train_batch_size=rows,
            max_steps=cfg["steps"] + 1,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=0.0,  # the other implementations do not clip either
            lmbda=0.0,  # off-policy: train on the batch's own responses
            beta=0.0,  # generalized JSD with beta 0 = KL(teacher || student), forward KL
            temperature=1.0,
            bf16=bf16,
            use_cpu=device == "cpu",
            optim="adamw_torch_fused" if device == "cuda" else "adamw_torch",
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            dataloader_num_workers=0,
            dataloader_pin_memory=False,  # the collator hands over the batch already on the device
            disable_tqdm=True,
        )
        trainer = GKDTrainer(
            model=student,
            teacher_model=teacher,
            args=args,
            train_dataset=Dataset.from_dict({"row": list(range(rows * (cfg["steps"] + 1)))}),
            data_collator=lambda features: {k: v.clone() for k, v in batch.items()},
            processing_class=tokenizer,
            callbacks=[timer],
        )
        trainer.train()
    return {"impl": "trl", "step_s": timer.times, "peak_gib": _peak_memory_gib(device), "device": device}


def _native_bf16() -> bool:
    import torch

    from srd.models.load import native_bf16

    return native_bf16("cuda" if torch.cuda.is_available() else "cpu")


def _tune_cpu_allocator() -> None:
    """Every row's process (hand-written ones too) runs with the allocator the srd CLI sets on a
    CPU (srd.utils.tune_cpu_allocator, this checkout's)."""
    import torch

    from srd.utils import tune_cpu_allocator

    if not torch.cuda.is_available():
        tune_cpu_allocator()


def _commit(folder: Path) -> str:
    """The short commit of a git checkout, with '+changes' when its tracked files differ; '' if none."""

    def git(*a: str) -> str:
        proc = subprocess.run(["git", "-C", str(folder), *a], capture_output=True, text=True)
        return proc.stdout.strip() if proc.returncode == 0 else ""

    rev = git("rev-parse", "--short", "HEAD")
    return rev + ("+changes" if rev and git("status", "--porcelain", "--untracked-files=no") else "")


def _text(data) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else data or ""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--impls", nargs="+", default=IMPLS, choices=IMPLS + VARIANTS)
    p.add_argument("--steps", type=int, default=None, help="timed steps per implementation (after 1 warm-up)")
    p.add_argument("--teacher", default=None)
    p.add_argument("--student", default=None)
    p.add_argument("--batch", type=int, default=None, help="sequences per step (default: the preset's)")
    p.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's)")
    p.add_argument(
        "--dtypes",
        nargs="+",
        default=None,
        type=lambda v: {"bfloat16": "bf16", "fp32": "float32"}.get(v, v),  # either spelling
        choices=["float32", "bf16"],
        help="precisions to run every implementation at (default: the preset's); ratios are against naive at the first",
    )
    p.add_argument("--dtype", default=None, help=argparse.SUPPRESS)  # internal: the child's precision
    p.add_argument("--record", default=None)
    p.add_argument("--timeout", type=float, default=None, help="seconds allowed to each implementation")
    p.add_argument("--profile", action="store_true", help="profile the steps (phases, operators) instead")
    p.add_argument("--loss-only", action="store_true", help="time the forward-KL loss alone (hand vs autograd)")
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every implementation this many times, interleaved (one round after another), and report "
        "the median step over all rounds with each round's median",
    )
    p.add_argument(
        "--against",
        default=None,
        metavar="DIR",
        help="another checkout of srd (e.g. a `git worktree` of an earlier commit): every srd implementation "
        "also runs with DIR's srd package, interleaved with this checkout's, rows labelled (DIR's name)",
    )
    p.add_argument("--code", default=None, help=argparse.SUPPRESS)  # internal: the child's srd checkout
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: run one impl, print JSON
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    if args.rounds > 1 and args.profile:
        p.error("--rounds repeats timed steps; a profile is one run (drop --rounds)")
    if args.against is not None and not (Path(args.against) / "srd" / "__init__.py").is_file():
        p.error(f"--against {args.against}: no srd package there (expected {Path(args.against) / 'srd'})")
    _tune_cpu_allocator()  # process-wide and kept: glibc's settings outlive the module
    if args.code:  # the checkout under comparison comes first, its srd imported afresh
        for name in [m for m in sys.modules if m == "srd" or m.startswith("srd.")]:
            del sys.modules[name]
        sys.path.insert(0, str(Path(args.code).resolve()))
    if args.profile and not args.child and "trl" in args.impls:
        p.error("--profile covers naive and the srd implementations, not trl (pass --impls)")
    cfg = dict(PRESETS[args.preset])
    for key in ("steps", "teacher", "student", "batch", "seq", "dtype"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    dtypes = args.dtypes or [cfg["dtype"]]
    if args.loss_only:
        return loss_benchmark(args)
    if args.child:
        import srd

        result = {**run_impl(args.child, cfg, profile=args.profile), "srd": str(Path(srd.__file__).resolve().parent)}
        print("RESULT " + json.dumps(result))
        return 0
    if not cfg["student"].startswith("random:") and not Path(cfg["student"]).exists():
        print(
            f"error: {cfg['student']} does not exist; make it with\n  srd prune --teacher smollm2-135m-instruct "
            f"--layers 20 --heal-steps 80 --out {cfg['student']}",
            file=sys.stderr,
        )
        return 2
    if "bf16" in dtypes and not _native_bf16():
        p.error("--dtypes bf16: this machine has no native bf16 matmuls (no bf16 GPU, no AVX512-BF16/AMX CPU)")
    results, skipped, failed = [], [], []
    rounds: dict[str, list[dict]] = {}  # label -> that implementation's result in every round
    against = Path(args.against).resolve() if args.against else None
    if "trl" in args.impls and importlib.util.find_spec("trl") is None:
        print("trl: skipped (not installed; `pip install trl==1.16.0` adds TRL's GKDTrainer)")
        skipped.append("trl")
    runs = [
        (d, i, code)
        for d in dtypes
        for i in args.impls
        if i not in skipped
        for code in ([None, against] if against and i.startswith("srd") else [None])
    ]
    from benchmarks.common import Stopped, sigterm_stops

    todo = [(k, run) for k in range(args.rounds) for run in runs]
    done = 0
    with sigterm_stops():
        try:
            while done < len(todo):
                _run_one(args, cfg, dtypes, *todo[done], results, rounds, failed)
                done += 1
        except Stopped:  # over the caller's time limit: record the finished rows, name the rest
            rest = [impl + f" @ {d}" * (len(dtypes) > 1) for _, (d, impl, _) in todo[done:]]
            print(f"stopped (SIGTERM); not run: {', '.join(rest)}", file=sys.stderr)
            failed.append(f"stopped by SIGTERM (a time limit) before: {', '.join(rest)}")
    _aggregate(cfg, args.rounds > 1, rounds, results)
    return _record(args, cfg, dtypes, against, results, skipped, failed)


def _run_one(args, cfg: dict, dtypes: list[str], round_: int, run: tuple, results: list, rounds: dict, failed: list):
    """One implementation at one precision in its own process; its result into `results` (a
    profile) or `rounds` (timed steps), or why it failed into `failed`."""
    dtype, impl, code = run
    multi = args.rounds > 1
    label = impl if len(dtypes) == 1 else f"{impl} @ {dtype}"
    label += f" ({code.name})" if code else ""
    cmd = [sys.executable, __file__, "--preset", args.preset, "--child", impl] + ["--profile"] * args.profile
    for key in ("steps", "teacher", "student", "batch", "seq"):
        cmd += [f"--{key}", str(cfg[key])]
    cmd += ["--dtype", dtype] + (["--code", str(code)] if code else [])
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=args.timeout)
        out, err, rc = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        out, err, rc = _text(e.stdout), _text(e.stderr) + f"\ntimed out after {args.timeout} s", -1
    line = next((x for x in out.splitlines() if x.startswith("RESULT ")), None)
    if rc != 0 or line is None:
        # one failing implementation must not cost the others' measurements: record why
        print(f"{label}: failed\n{err[-3000:]}", file=sys.stderr)
        last = [x for x in err.strip().splitlines() if x.strip()]
        failed.append(f"{label} ({last[-1].strip()[:200] if last else f'exit {rc}'})")
        return
    r = {**json.loads(line[len("RESULT ") :]), "label": label, "dtype": dtype}
    if Path(r["srd"]).parent != (code or ROOT):  # a comparison of the same code would pass unnoticed
        failed.append(f"{label} (imported srd from {r['srd']}, not from {code or ROOT})")
        return
    at = f" (round {round_ + 1})" * multi
    if args.profile:
        results.append(r)
        print(f"{label}{at}: {r['wall_s']:.2f} s/step profiled: " + ", ".join(f"{n} {t:.2f} s" for n, t in r["phases"]))
        return
    r["median_s"] = statistics.median(r["step_s"])
    rounds.setdefault(label, []).append(r)
    print(f"{label}{at}: {r['median_s']:.2f} s/step, peak {r['peak_gib']:.2f} GiB")


def _aggregate(cfg: dict, multi: bool, rounds: dict, results: list) -> None:
    """One row per implementation, over all its rounds, into `results`."""
    for label, rs in rounds.items():
        r = {**rs[0], "step_s": [t for x in rs for t in x["step_s"]], "rounds": [x["median_s"] for x in rs]}
        r["median_s"] = statistics.median(r["step_s"])
        r["tok_s"] = cfg["batch"] * cfg["seq"] / r["median_s"]
        r["peak_gib"] = max(x["peak_gib"] for x in rs)
        if all("step_tensors_gib" in x for x in rs):
            r["step_tensors_gib"] = max(x["step_tensors_gib"] for x in rs)
        if r.get("cache_build_s") is not None:
            r["cache_build_s"] = statistics.median(x["cache_build_s"] for x in rs)
        results.append(r)
        if multi:
            print(f"{label}: {r['median_s']:.2f} s/step over {len(rs)} rounds, {r['tok_s']:.0f} tokens/s")
        else:
            print(f"{label}: {r['median_s']:.2f} s/step, {r['tok_s']:.0f} tokens/s, peak {r['peak_gib']:.2f} GiB")


def _record(args, cfg: dict, dtypes: list[str], against: Path | None, results: list, skipped: list, failed: list):
    """Write the record (the throughput table, or the profile) of what ran; the exit status."""
    from benchmarks.common import header, save_record

    multi = args.rounds > 1

    if not results:
        print("error: no implementation ran: " + "; ".join(failed), file=sys.stderr)
        return 1
    if args.profile:
        text = profile_record(args, cfg, results)
        if failed:
            text += f"\nFailed: {'; '.join(failed)}.\n"
        save_record(text, args.record, args.preset, "profile")
        return 0

    def naive_at(dtype: str) -> dict | None:
        return next((r for r in results if r["impl"] == "naive" and r["dtype"] == dtype), None)

    base = naive_at(dtypes[0]) or results[0]
    mem = "GPU allocator peak" if results[0]["device"] == "cuda" else "peak RSS of the process"
    bf16_note = " (bf16: teacher weights in bf16, student under bf16 autocast)" * ("bf16" in dtypes)
    precision = " and ".join(dtypes) + bf16_note
    lines = header(f"KD step throughput, preset `{args.preset}`") + [
        f"Teacher `{cfg['teacher']}`, student `{cfg['student']}`, batch {cfg['batch']} x {cfg['seq']} tokens "
        f"(3/4 of them targets), {precision}, forward KL, AdamW; median of {cfg['steps']} steps after 1 warm-up"
        + (
            f" in each of {args.rounds} rounds (every implementation once per round, in turn), over all of them"
            if multi
            else ""
        )
        + f"; memory = {mem}"
        + (" (the largest of the rounds)" if multi else "")
        + ".",
        "",
    ]
    if against:
        theirs, ours = (f" ({c})" if c else "" for c in (_commit(against), _commit(ROOT)))
        lines += [
            f"Rows labelled ({against.name}) ran srd's code from `{against}`{theirs}; "
            f"the others from this checkout{ours}.",
            "",
        ]
    same = len(dtypes) > 1  # a column against the hand-written step at the row's own precision
    ref = f"vs {base['label']}" if same else "vs naive"
    tensors = any("step_tensors_gib" in r for r in results)  # on a CPU
    if tensors:
        lines += [
            "Step tensors = the most tensor memory one more step (after the timed ones) allocated and held at "
            "once, from torch.profiler's memory events (the weights and AdamW's state, allocated before, are "
            "not in it; neither is TRL's step, which runs inside its trainer): on a CPU, where freed memory "
            "stays in the process, the counterpart of a GPU allocator's peak.",
            "",
        ]
    lines += [
        f"| implementation | s/step (median) | tokens/s | {ref} | peak memory (GiB) | {ref} |"
        + " step tensors (GiB) |" * tensors
        + " vs naive at its precision (speed / memory) |" * same
        + " each round's median (s) |" * multi,
        "|---|---|---|---|---|---|" + "---|" * tensors + "---|" * same + "---|" * multi,
    ]
    for r in results:
        row = (
            f"| {r['label']} | {r['median_s']:.3f} | {r['tok_s']:.0f} | {r['tok_s'] / base['tok_s']:.2f}x | "
            f"{r['peak_gib']:.2f} | {r['peak_gib'] / base['peak_gib']:.2f}x |"
        )
        if tensors:
            row += f" {r['step_tensors_gib']:.3g} |" if "step_tensors_gib" in r else " - |"
        own = naive_at(r["dtype"])
        if same:
            row += f" {r['tok_s'] / own['tok_s']:.2f}x / {r['peak_gib'] / own['peak_gib']:.2f}x |" if own else " - |"
        if multi:
            row += " " + ", ".join(f"{t:.3f}" for t in r["rounds"]) + " |"
        lines.append(row)
    builds = [f"{r['label']} {r['cache_build_s']:.2f} s" for r in results if r.get("cache_build_s") is not None]
    if builds:
        lines += [
            "",
            f"Teacher top-{CACHE_TOP_K} cache of the batch, built once before the timed steps (not in s/step): "
            + ", ".join(builds)
            + ". A cached step computes no teacher forward; SRD builds the cache once per run and reuses it "
            "over every epoch and stage.",
        ]
    if skipped:
        lines += ["", f"Not run (not installed here): {', '.join(skipped)}."]
    if failed:
        lines += ["", f"Failed: {'; '.join(failed)}."]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "throughput")
    return 0


if __name__ == "__main__":
    sys.exit(main())
