"""The training loop: trains ONE stage of distillation and knows nothing about SRD.

    loss = alpha * CE + (1 - alpha) * scale(tau) * D(p_tau || q_tau)      (SRD paper Eq. 6)

A stage is (student, teacher, examples, tau, alpha, epochs). SRD's curriculum calls this
once per stage; plain KD and SFT (alpha = 1) call it once. One accelerate code path
serves 1 CPU, 1 GPU and many processes. Every `save_every` steps a resumable checkpoint
is written; rerunning the same stage resumes exactly (same weights as an uninterrupted
run on the same hardware), and a finished stage is skipped (`done.json`).

Run-directory layout of a stage:
    checkpoints/step-NNNNNN/   resumable state (model, optimizer, scheduler, RNG, state.json)
    best/                      HF model with the best dev metric (dev ROUGE-L, else -dev loss)
    final/                     HF model at the end of the stage (hard links to best/'s files when
                               the last evaluation was the best: one copy of the weights on disk)
    logs/train.jsonl, logs/eval.jsonl, tb/ (TensorBoard), done.json
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from srd.config import ConfigError, RunConfig
from srd.data.example import Example
from srd.data.prompts import encode_prompt
from srd.data.tokenize import Encoded, bucketed_batches, collate, encode_examples, pad_id
from srd.generation.decode import generate_responses, row_seeds
from srd.generation.decoding import Decoding
from srd.losses.divergences import tau_scale
from srd.losses.kd import LossSums, combine
from srd.metrics.text import mean, rouge_l
from srd.models.features import compile_blocks, teacher_features
from srd.models.load import cast_for_inference, cast_parameters, inference_dtype_of, is_seq2seq, model_files_key
from srd.models.save import save_model_dir
from srd.rundir import RunDir, StageDir
from srd.runtime import make_accelerator
from srd.train import checkpoint as ckpt
from srd.train import distributed
from srd.train.onpolicy import on_policy_flags, sample_responses
from srd.train.step import DistillModule
from srd.train.teacher_store import StoredTeacher, TeacherStore, entry_meta, record_source, store_root
from srd.utils import (
    DamagedFileError,
    append_jsonl,
    atomic_write_json,
    atomic_write_text,
    read_json,
    read_jsonl,
    rng_state,
    seed_everything,
    set_rng_state,
)

log = logging.getLogger(__name__)


@dataclass
class StagePlan:
    """How many optimizer steps a stage takes, and which micro-batches each step uses."""

    lengths: list[int]
    batch_size: int
    grad_accum: int
    world: int
    seed: int
    steps_per_epoch: int
    total_steps: int

    @classmethod
    def make(
        cls,
        lengths: list[int],
        *,
        batch_size: int,
        grad_accum: int,
        world: int,
        seed: int,
        epochs: float,
        max_steps: int | None,
    ) -> StagePlan:
        n_batches = math.ceil(len(lengths) / batch_size)
        per_step = grad_accum * world
        steps_per_epoch = max(1, math.ceil(n_batches / per_step))
        total = max_steps if max_steps is not None else max(1, math.ceil(epochs * steps_per_epoch))
        return cls(lengths, batch_size, grad_accum, world, seed, steps_per_epoch, total)

    def step_batches(self, step: int) -> list[list[int]]:
        """All micro-batches (example indices) of optimizer step `step`, over all processes.

        The order depends only on (seed, epoch), which is what makes resume exact. The last
        step of an epoch is topped up from the epoch's start so every process gets work.
        """
        epoch, k = divmod(step, self.steps_per_epoch)
        batches = bucketed_batches(self.lengths, self.batch_size, seed=self.seed, epoch=epoch)
        per_step = self.grad_accum * self.world
        micro = batches[k * per_step : (k + 1) * per_step]
        if len(micro) % self.world:
            micro += batches[: self.world - len(micro) % self.world]
        return micro


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.cuda.is_available() and all(p.is_cuda for p in model.parameters())
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def _scheduler(
    optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int, window: tuple[int, int] | None = None
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup then cosine decay to min_lr.

    `window = (offset, total)` places this stage inside one longer schedule (SRD with
    curriculum.lr_schedule=global): step s of the stage uses the LR of step offset + s.
    """
    offset, total = window if window is not None else (0, total_steps)
    floor = cfg.min_lr / cfg.lr

    def factor(step: int) -> float:
        g = offset + step
        if g < cfg.warmup_steps:
            return (g + 1) / (cfg.warmup_steps + 1)
        progress = min(1.0, (g - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _truncate_log(path: Path, max_step: int) -> None:
    """Drop log rows written after the checkpoint we resume from, and a last row a kill cut
    short (read_jsonl's cut_ok; a garbled row elsewhere is its DamagedFileError); the log is
    replaced atomically, so a kill now loses none of its earlier rows."""
    if not path.exists():
        return
    lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = read_jsonl(path, cut_ok=True)  # line by line as `lines`, a torn last one left out
    kept = [line for line, row in zip(lines, rows) if row.get("step", 0) <= max_step]
    if len(kept) != len(lines):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


@dataclass
class _LossSpec:
    divergence: str
    tau: float
    alpha: float
    kd_scale: float


def _micro_loss(
    module: Any,
    teacher: Any,
    batch: dict[str, torch.Tensor],
    spec: _LossSpec,
    accelerator: Any,
    denominator: float,
    on_policy: bool = False,
    cached: Any = None,
) -> tuple[torch.Tensor, LossSums]:
    with accelerator.autocast():
        t_in, t_head = (None, None)
        if cached is not None:  # the teacher cache: no teacher forward
            t_in = cached
        elif spec.alpha < 1.0:
            t_in, t_head = teacher_features(teacher, batch)
        sums = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_in, t_head)
    if on_policy:  # no CE on the student's own samples: only the divergence teaches
        sums = LossSums(ce=sums.ce * 0.0, kd=sums.kd, n_tokens=sums.n_tokens)
    # DDP averages gradients over processes; the loss is a sum over the step's tokens
    # divided by their global count, so multiply back by the number of processes.
    loss = combine(sums, alpha=spec.alpha, kd_scale=spec.kd_scale, denominator=denominator)
    return loss * accelerator.num_processes, sums


def evaluate_dev(
    module: Any,
    teacher: Any,
    tokenizer: Any,
    cfg: RunConfig,
    dev_encoded: Sequence[Encoded],
    dev_examples: Sequence[Example],
    spec: _LossSpec,
    accelerator: Any,
    student: Any = None,
    store: TeacherStore | None = None,
    answers: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Dev loss (same objective) and ROUGE-L of greedy answers on the first dev rows.
    `student`: the unsharded model to generate with (default: the module's own student);
    `store`: the teacher store the dev rows' teacher side is read from (else the teacher runs);
    `answers`: a list the dev answers are appended to on the main process, in dev-row order
    (each seed's in turn): {"id", "seed" (None: greedy), "prediction", "score"}."""
    from accelerate.utils import gather_object

    student = accelerator.unwrap_model(module).student if student is None else student
    device = accelerator.device
    metrics: dict[str, float] = {}
    rank, world = accelerator.process_index, accelerator.num_processes
    if dev_encoded:
        module.eval()
        ce = kd = 0.0
        n = 0
        local = sorted(list(dev_encoded)[rank::world], key=lambda e: -len(e.input_ids))  # little padding
        bs = cfg.train.batch_size
        n_batches = math.ceil(len(local) / bs)
        if distributed.is_sharded(module):  # FSDP: every process runs as many forwards (collectives)
            n_batches = math.ceil(math.ceil(len(dev_encoded) / world) / bs)
        with torch.no_grad():
            for i in range(0, n_batches * bs, bs):
                rows = local[i : i + bs]
                batch = {k: v.to(device) for k, v in collate(rows or dev_encoded[:1], pad_id(tokenizer)).items()}
                cached = store.rows(rows or dev_encoded[:1], device, spec.tau) if store is not None else None
                _, sums = _micro_loss(module, teacher, batch, spec, accelerator, 1.0, cached=cached)
                if rows:  # a process short of rows ran a padding forward: not counted
                    ce, kd, n = ce + sums.ce.item(), kd + sums.kd.item(), n + sums.n_tokens
        totals = torch.tensor([ce, kd, float(n)], device=device)
        totals = accelerator.reduce(totals, reduction="sum")
        ce, kd, n = totals.tolist()
        metrics["dev_ce"] = ce / max(n, 1)
        metrics["dev_kd"] = kd / max(n, 1)
        metrics["dev_loss"] = spec.alpha * metrics["dev_ce"] + (1 - spec.alpha) * spec.kd_scale * metrics["dev_kd"]
        module.train()
    n_gen = min(cfg.dev_eval.num_examples, len(dev_examples))
    if n_gen:
        rows = list(range(n_gen))[rank::world]
        prompts = [
            encode_prompt(tokenizer, dev_examples[i], cfg.data.prompt_format, cfg.data.max_prompt_len) for i in rows
        ]
        g, seeds = cfg.generation, cfg.dev_eval.seeds
        with decoding_model(module, student, device, cfg, accelerator) as model:
            # with the decode loop whatever generation.backend says (a vLLM engine would restart
            # at every evaluation: the weights change in between); greedy, or sampled at T = 1
            # with one seed per (dev row, dev_eval seed), the same at every evaluation
            sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if seeds else {}
            decoding = Decoding.of(
                g, max_new_tokens=cfg.dev_eval.max_new_tokens, backend="loop", **{"do_sample": False, **sampling}
            )
            kept = []
            for seed in seeds or [None]:
                all_rows = row_seeds(seed, n_gen) if seed is not None else None
                per_row = None if all_rows is None else [all_rows[i] for i in rows]
                texts = generate_responses(model, tokenizer, prompts, decoding, seeds=per_row)
                kept += [(seed, i, a, rouge_l(a, dev_examples[i].references)) for a, i in zip(texts, rows)]
        gathered = gather_object(kept)  # one collective: the scores and, for `answers`, the texts
        metrics["dev_rougeL"] = mean([r[3] for r in gathered])
        if answers is not None:
            order = {seed: k for k, seed in enumerate(seeds or [None])}
            every = sorted(gathered, key=lambda r: (order[r[0]], r[1]))
            if accelerator.is_main_process:
                answers += [
                    {"id": dev_examples[i].id, "seed": seed, "prediction": a, "score": sc} for seed, i, a, sc in every
                ]
    return metrics


@contextlib.contextmanager
def decoding_model(module: Any, student: Any, device: Any, cfg: RunConfig, accelerator: Any) -> Iterator[Any]:
    """The student to decode with inside training (dev ROUGE-L, on-policy samples): the
    generation replica (distributed.generation_model) with its weights in generation.dtype for the
    duration; the float32 weights that train are put back afterwards."""
    dtype = inference_dtype_of(cfg.generation.dtype, bf16_training=accelerator.mixed_precision == "bf16")
    with distributed.generation_model(module, student, device) as replica, cast_for_inference(replica, dtype) as model:
        yield model


def on_accelerators(setting: bool | str, device: Any) -> bool:
    """A memory-for-compute setting (loss.recompute_chunks, loss.recompute_log_probs): `auto`
    means on accelerators, where memory is the constraint, and not on CPUs."""
    if isinstance(setting, bool):
        return setting
    return torch.device(device).type != "cpu"


def encode_stage_rows(
    cfg: RunConfig, tokenizer: Any, train: Sequence[Example], dev: Sequence[Example], s2s: bool
) -> tuple[list[Encoded], list[Encoded]]:
    """The token rows a stage trains on and measures its dev loss on (the first data.dev_limit dev
    examples): what the loss reads, and what the teacher store keys its rows by."""
    d = cfg.data
    kw = dict(fmt=d.prompt_format, max_prompt_len=d.max_prompt_len, max_len=d.max_len, seq2seq=s2s)
    return encode_examples(tokenizer, list(train), **kw), encode_examples(
        tokenizer, list(dev)[: d.dev_limit or None], **kw
    )


def cache_temperatures(cfg: RunConfig, tau: float, stage_taus: Sequence[float] = ()) -> list[float]:
    """Every temperature the teacher store must serve this run: this stage's `tau`, loss.tau, and
    `stage_taus` (the temperatures of the run's other stages, given by the caller: one build serves
    every stage of a curriculum)."""
    return sorted({round(float(t), 9) for t in (*stage_taus, cfg.loss.tau, tau)})


# stored with every row whatever the run asks for (a tail logit each: 2 bytes per position), so
# that a KD baseline at tau 1 and SRD's stages at 1, 1.5 and 2 share the same rows
STORE_TAUS = (1.0, 1.5, 2.0)


def teacher_store_meta(cfg: RunConfig, teacher: Any, tokenizer: Any) -> dict[str, Any]:
    """The teacher store entry this run's teacher and loss.teacher_top_k read and write."""
    return entry_meta(teacher, len(tokenizer), cfg.loss.teacher_top_k)


def _teacher_store(
    cfg: RunConfig, teacher: Any, tokenizer: Any, rows: Sequence[Encoded], acc: Any, taus: Sequence[float]
) -> tuple[TeacherStore, float]:
    """Build (main process) the rows the store lacks, then open it on every process; (store,
    seconds this call spent building). The run's teacher-store.json adds the seconds of each shard
    as it is written (an interrupted build's too) and what every row the run uses cost."""

    root = store_root(cfg.loss.teacher_store)
    meta = teacher_store_meta(cfg, teacher, tokenizer)
    record_path = RunDir(cfg.run_dir).teacher_store
    seconds = 0.0
    if acc.is_main_process:
        store = TeacherStore(root, meta)
        record = _store_record(record_path, store)

        def on_shard(s: float) -> None:
            record["built_s"] = round(record["built_s"] + s, 3)
            atomic_write_json(record_path, record)

        done = store.build(teacher, tokenizer, rows, sorted({*taus, *STORE_TAUS}), on_shard=on_shard)
        seconds = done.seconds
        if done.rows:
            log.info("teacher store: %d rows added in %.0f s (%s)", done.rows, seconds, store.folder)
        record["rows_cost_s"].update(store.row_costs(rows))
        atomic_write_json(record_path, record)
        source = teacher_source_key(cfg, next(teacher.parameters()).dtype)
        if source is not None:
            record_source(root, source, store.folder.name)
        store.note_use(cfg.model.teacher)
    acc.wait_for_everyone()
    return TeacherStore(root, meta), seconds


def teacher_source_key(cfg: RunConfig, dtype: Any) -> str | None:
    """The key of the teacher's files (and adapter's, and the precision it runs in) under which
    the store remembers its entry (models.load.model_files_key)."""
    m = cfg.model
    adapter = model_files_key(m.teacher_adapter) if m.teacher_adapter else None
    if m.teacher is None or (m.teacher_adapter and adapter is None):
        return None
    return model_files_key(m.teacher, adapter, str(dtype), cfg.loss.teacher_top_k)


def _store_record(path: Path, store: TeacherStore) -> dict[str, Any]:
    """The run's teacher-store.json (what it took from the store), pointed at `store`'s entry."""
    try:
        record = read_json(path) if path.exists() else {}
    except DamagedFileError:  # derived bookkeeping: start it again (the rows are in the store)
        log.warning("%s is damaged: the run's teacher time restarts from this build", path)
        record = {}
    record.update(store=str(store.root), entry=store.folder.name)
    record.setdefault("built_s", 0.0)
    record.setdefault("rows_cost_s", {})
    return record


def _record_rows(cfg: RunConfig, store: TeacherStore, rows: Sequence[Encoded], acc: Any, taus: Sequence[float]) -> None:
    """A run served by the store alone: every row must be there (the caller checked); record
    their cost as _teacher_store does."""
    lacking = store.missing(rows, taus)
    if lacking:
        raise ckpt.CheckpointError(
            f"the teacher store entry {store.folder} lacks {len(lacking)} of this stage's rows, though the run "
            "found them all at its start (was the entry changed meanwhile?); rerun the same command: the "
            "teacher is then loaded and the rows are computed"
        )
    if acc.is_main_process:
        path = RunDir(cfg.run_dir).teacher_store
        record = _store_record(path, store)
        record["rows_cost_s"].update(store.row_costs(rows))
        atomic_write_json(path, record)
    acc.wait_for_everyone()


class StageSummary(TypedDict):
    """What one trained stage reports (train_stage's result, also `<stage>/done.json`)."""

    complete: bool  # false: paused on purpose (train.stop_after_steps); rerun to continue
    steps: int  # optimizer steps done
    total_steps: int
    steps_per_epoch: int
    examples: int
    tau: float
    alpha: float
    divergence: str
    kd_scale: float  # the factor on the divergence: tau^2 under loss.tau_squared=all
    wall_time_s: float  # the stage's clock: steps, dev evaluations, checkpoints; resumed invocations included
    dev_eval_s: float  # of which dev evaluations (the one at step 0 included)
    generation_s: float  # of which on-policy sampling
    teacher_cache_s: float  # building the rows the teacher store lacked (not in wall_time_s)
    on_policy_ratio: float
    tokens: int
    best_metric: float | None  # dev ROUGE-L, else minus the dev loss
    first_eval: dict[str, Any] | None  # the first dev evaluation: {"step", "dev_loss", ...}
    last_eval: dict[str, Any] | None
    best_step: int | None


def train_stage(
    cfg: RunConfig,
    *,
    student: Any,
    teacher: Any,
    tokenizer: Any,
    train_examples: Sequence[Example],
    dev_examples: Sequence[Example] = (),
    out_dir: Path,
    tau: float | None = None,
    alpha: float | None = None,
    epochs: float | None = None,
    max_steps: int | None = -1,
    stage_taus: Sequence[float] = (),
    lr_window: tuple[int, int] | None = None,
    eval_at_start: bool = True,
    accelerator: Any = None,
    progress: bool = True,
    desc: str = "train",
) -> StageSummary:
    """Train one stage and return its summary (also written to out_dir/done.json).

    tau / alpha / epochs default to the config's loss.tau, loss.alpha, train.epochs;
    max_steps defaults (-1) to train.max_steps, and None means "use epochs". `stage_taus`: the
    temperatures of the caller's other stages, which a teacher cache (loss.teacher_top_k) built
    here must serve too; the loop knows nothing of how the stages were planned.
    """
    out_dir = Path(out_dir)
    done = StageDir(out_dir).done
    if done.exists():
        return read_json(done)
    acc = accelerator or make_accelerator(cfg.train.precision, cfg.train.sharding)
    run = _StageRun(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        train_examples=train_examples,
        dev_examples=dev_examples,
        out_dir=out_dir,
        tau=cfg.loss.tau if tau is None else tau,
        alpha=cfg.loss.alpha if alpha is None else alpha,
        epochs=cfg.train.epochs if epochs is None else epochs,
        max_steps=cfg.train.max_steps if max_steps == -1 else max_steps,
        stage_taus=stage_taus,
        lr_window=lr_window,
        acc=acc,
        desc=desc,
    )
    run.resume()
    run.open_writer()
    start, total = run.state["step"], run.plan.total_steps
    run.start_clock()
    if start == 0 and eval_at_start and run.latest is None:
        run.evaluate(0)  # the starting point, for before/after comparisons
    stop_at = total if cfg.train.stop_after_steps is None else min(total, start + cfg.train.stop_after_steps)
    bar = tqdm(
        total=total,
        initial=start,
        desc=desc,
        disable=not (progress and acc.is_main_process),
        unit="step",
        dynamic_ncols=True,
    )
    tcfg = cfg.train
    for step in range(start, stop_at):
        row = run.train_step(step)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
        done_steps, last = step + 1, step + 1 == total
        if (tcfg.eval_every and done_steps % tcfg.eval_every == 0) or last:
            run.evaluate(done_steps)
        if (tcfg.save_every and done_steps % tcfg.save_every == 0) or last or done_steps == stop_at:
            run.save(done_steps)
    bar.close()
    return run.finish(max(start, stop_at))


class _StageRun:
    """One stage of training, by concern: set-up (the data, the plan, the wrapped student, the
    optimizer, the teacher and its cache), resume from the latest checkpoint, one optimizer
    step, a dev evaluation, a checkpoint, and the end of the stage (final/, done.json)."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        student: Any,
        teacher: Any,
        tokenizer: Any,
        train_examples: Sequence[Example],
        dev_examples: Sequence[Example],
        out_dir: Path,
        tau: float,
        alpha: float,
        epochs: float,
        max_steps: int | None,
        stage_taus: Sequence[float],
        lr_window: tuple[int, int] | None,
        acc: Any,
        desc: str,
    ) -> None:
        tcfg, lcfg = cfg.train, cfg.loss
        self.cfg, self.acc, self.desc, self.dirs = cfg, acc, desc, StageDir(out_dir)
        self.student, self.teacher, self.tokenizer = student, teacher, tokenizer
        self.tau, self.alpha, self.dev_examples = tau, alpha, dev_examples
        self.spec = _LossSpec(lcfg.divergence, tau, alpha, tau_scale(lcfg.divergence, tau, lcfg.tau_squared))
        if tcfg.num_threads:
            torch.set_num_threads(tcfg.num_threads)
        seed_everything(cfg.seed)
        self._encode(train_examples, dev_examples)
        self.plan = StagePlan.make(
            [len(e.input_ids) for e in self.enc],
            batch_size=tcfg.batch_size,
            grad_accum=tcfg.grad_accum,
            world=acc.num_processes,
            seed=cfg.seed,
            epochs=epochs,
            max_steps=max_steps,
        )
        self._build_module(lr_window)
        self.latest = ckpt.latest_checkpoint(self.dirs.checkpoints)
        if self.latest is not None:  # a damaged file is named now, before any work, never skipped silently
            ckpt.verify_checkpoint(self.latest)
        self.store: TeacherStore | None = None
        self.cache_s = 0.0
        if lcfg.teacher_top_k and self.uses_teacher:
            taus = cache_temperatures(cfg, tau, stage_taus)
            rows = [*self.enc, *self.dev_enc]  # the dev loss is read from the store too
            if isinstance(teacher, StoredTeacher):  # every row stored: the teacher was never loaded
                if cfg.on_policy.ratio:
                    raise ConfigError("on-policy batches (on_policy.ratio > 0) need the teacher model, not its store")
                self.store = teacher.store
                _record_rows(cfg, self.store, rows, acc, taus)
            else:
                self.store, self.cache_s = _teacher_store(cfg, teacher, tokenizer, rows, acc, taus)
        self.state: dict[str, Any] = {"step": 0, "best_metric": None, "best_step": None, "elapsed_s": 0.0, "tokens": 0}
        self.micro_per_step = tcfg.grad_accum * acc.num_processes
        self.ratio = float(cfg.on_policy.ratio or 0.0)
        self.writer: Any = None

    @property
    def uses_teacher(self) -> bool:
        return self.teacher is not None and self.alpha < 1.0

    def _encode(self, train_examples: Sequence[Example], dev_examples: Sequence[Example]) -> None:
        cfg = self.cfg
        self.s2s = is_seq2seq(self.student)
        if self.s2s and (cfg.on_policy.ratio or 0) > 0:
            raise ConfigError("on-policy sampling (on_policy.ratio > 0) supports decoder-only students only")
        self.enc, self.dev_enc = encode_stage_rows(cfg, self.tokenizer, train_examples, dev_examples, self.s2s)
        self.n_targets = [e.n_loss_targets for e in self.enc]  # what the loss counts

    def _build_module(self, lr_window: tuple[int, int] | None) -> None:
        """The student wrapped with the loss, sharded or prepared for its distributed backend,
        its optimizer and schedule, and the teacher on the device in its inference precision."""
        cfg, acc, student, teacher = self.cfg, self.acc, self.student, self.teacher
        tcfg, lcfg = cfg.train, cfg.loss
        module = DistillModule(
            student,
            divergence=lcfg.divergence,
            tau=self.tau,
            beta=lcfg.beta,
            chunk_size=lcfg.chunk_size,
            vocab_size=len(self.tokenizer),
            recompute=on_accelerators(lcfg.recompute_chunks, acc.device),
            recompute_log_probs=on_accelerators(lcfg.recompute_log_probs, acc.device),
        )
        module.train()
        self.sharded = distributed.use_sharding(cfg, acc)
        self.deepspeed = distributed.use_deepspeed(cfg, acc)
        if self.sharded:  # FSDP: a sharded copy trains; `student` gets its weights back at the end
            module.student = copy.deepcopy(student).to(acc.device)
            distributed.shard_student(module)
        if tcfg.compile:
            compile_blocks(student)
            if self.uses_teacher and not isinstance(teacher, StoredTeacher):
                compile_blocks(teacher)
        optimizer = _optimizer(module, tcfg.lr, tcfg.weight_decay)
        self.scheduler = _scheduler(optimizer, tcfg, self.plan.total_steps, lr_window)
        self.zero = (
            distributed.zero_layout(acc) if self.deepspeed else None
        )  # what a checkpoint's optimizer files are split by
        if self.deepspeed:
            distributed.deepspeed_config(acc, tcfg)
        if not self.sharded:  # DeepSpeed: `module` becomes its engine (ZeRO partitions the optimizer state)
            module, optimizer = acc.prepare(module, optimizer)
        self.module, self.optimizer = module, optimizer
        if self.uses_teacher and not isinstance(teacher, StoredTeacher):
            teacher_dtype = inference_dtype_of(cfg.model.teacher_dtype, bf16_training=acc.mixed_precision == "bf16")
            cast_parameters(teacher, teacher_dtype, acc.device).eval().requires_grad_(False)

    def _check_resumable(self, saved: dict[str, Any]) -> None:
        """A checkpoint resumes only with the same micro-batches per step, precision and ZeRO layout."""
        acc, tcfg, latest = self.acc, self.cfg.train, self.latest
        if saved.get("micro_per_step", self.micro_per_step) != self.micro_per_step:
            raise ConfigError(
                f"{latest} was written with {saved['micro_per_step']} micro-batches per step (processes x "
                f"train.grad_accum) but this run has {acc.num_processes} x {tcfg.grad_accum}; resume with the same "
                f"product (e.g. train.grad_accum={saved['micro_per_step'] // acc.num_processes} on "
                f"{acc.num_processes} process(es)) so the remaining steps see the same batches"
            )
        # train.precision=auto resolves per machine (bf16 on a CPU with native bf16, fp32 on one
        # without): a checkpoint resumes only under the precision it was trained with
        if saved.get("mixed_precision", acc.mixed_precision) != acc.mixed_precision:
            was = "bf16" if saved["mixed_precision"] == "bf16" else "fp32"
            raise ConfigError(
                f"{latest} was trained with precision {was} but this run resolves train.precision="
                f"{tcfg.precision} to {'bf16' if acc.mixed_precision == 'bf16' else 'fp32'} here; resume it with "
                f"train.precision={was}"
            )
        if saved.get("zero") != self.zero:
            raise ConfigError(distributed.zero_mismatch(latest, saved.get("zero"), self.zero))

    def resume(self) -> None:
        """Continue from the latest checkpoint (weights, optimizer, schedule, RNG, state, logs), or
        start fresh, dropping log rows of an attempt killed before its first checkpoint."""
        acc, latest, module, optimizer = self.acc, self.latest, self.module, self.optimizer
        if latest is None:
            if acc.is_main_process:
                for log_file in (self.dirs.train_log, self.dirs.eval_log):
                    _truncate_log(log_file, -1)
            return
        saved = ckpt.read_state(latest)
        self._check_resumable(saved)
        where = "cpu" if acc.device.type == "cpu" else acc.device  # gloo processes report "cpu:<rank>"
        if self.deepspeed:  # every process reads every partition's file (ZeRO picks its own)
            ckpt.load_weights(acc.unwrap_model(module).student, latest)
            allowed = distributed.zero_safe_globals()
            parts = [ckpt.load_state(f, where, allowed) for f in distributed.zero_files(latest, self.zero)]
            optimizer.optimizer.load_state_dict(parts, load_from_fp32_weights=True)
        else:
            saved_opt = ckpt.load_state(latest / "optimizer.pt", where)
            if self.sharded:
                distributed.load_full_state_dict(module, ckpt.read_weights(latest))
                distributed.load_full_optimizer_state(module, optimizer, saved_opt)
            else:
                ckpt.load_weights(acc.unwrap_model(module).student, latest)
                optimizer.load_state_dict(saved_opt)
        self.scheduler.load_state_dict(ckpt.load_state(latest / "scheduler.pt"))
        rng_file = latest / f"rng_{acc.process_index}.pt"
        if not rng_file.exists():  # resumed on more processes than wrote the checkpoint
            log.warning("%s missing: process %d continues from rank 0's RNG state", rng_file.name, acc.process_index)
            rng_file = latest / "rng_0.pt"
        set_rng_state(ckpt.load_state(rng_file))
        self.state = saved
        self.cache_s += float(saved.get("teacher_cache_s", 0.0))  # built before the interruption
        if acc.is_main_process:
            for log_file in (self.dirs.train_log, self.dirs.eval_log):
                _truncate_log(log_file, self.state["step"])

    def open_writer(self) -> None:
        if self.acc.is_main_process:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.dirs.tensorboard))

    def start_clock(self) -> None:
        self.t_run, self.elapsed0 = time.perf_counter(), self.state["elapsed_s"]
        self.state.setdefault("generation_s", 0.0)
        self.state.setdefault("dev_eval_s", 0.0)
        self.state["teacher_cache_s"] = self.cache_s

    def tick(self) -> float:
        """The stage's clock now (earlier invocations included), also kept in the state that
        checkpoints save, so that a resumed stage counts what came before."""
        self.state["elapsed_s"] = self.elapsed0 + time.perf_counter() - self.t_run
        return self.state["elapsed_s"]

    def _full_weights(self, needed: bool = True) -> dict[str, Any] | None:
        """FSDP: the gathered full weights (a collective: every process calls it); else None."""
        return distributed.full_state_dict(self.module) if self.sharded and needed else None

    def _trained_student(self) -> Any:
        return self.acc.unwrap_model(self.module).student

    def save(self, step: int) -> None:
        """A resumable checkpoint at `step`, written into a temporary folder and renamed."""
        acc, tmp = self.acc, ckpt.tmp_checkpoint_dir(self.dirs.checkpoints, step)
        if acc.is_main_process:
            tmp.mkdir(parents=True, exist_ok=True)
        acc.wait_for_everyone()
        torch.save(rng_state(), tmp / f"rng_{acc.process_index}.pt")
        acc.wait_for_everyone()
        weights = self._full_weights()  # collective
        if self.deepspeed:  # each process writes its own partition of the optimizer state
            torch.save(self.optimizer.optimizer.state_dict(), distributed.zero_files(tmp, self.zero)[acc.process_index])
            acc.wait_for_everyone()
        opt_state = distributed.full_optimizer_state(self.module, self.optimizer) if self.sharded else None
        if acc.is_main_process:
            self._trained_student().save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            if not self.deepspeed:
                torch.save(opt_state if self.sharded else self.optimizer.state_dict(), tmp / "optimizer.pt")
            torch.save(self.scheduler.state_dict(), tmp / "scheduler.pt")
            meta = {
                **self.state,
                "step": step,
                "micro_per_step": self.micro_per_step,
                "mixed_precision": acc.mixed_precision,
            }
            ckpt.finish_checkpoint(self.dirs.checkpoints, step, {**meta, "zero": self.zero} if self.zero else meta)
            # keep_last 0: the last checkpoint stays until the stage is done
            ckpt.prune_checkpoints(self.dirs.checkpoints, max(self.cfg.train.keep_last, 1))
        acc.wait_for_everyone()

    def evaluate(self, step: int) -> None:
        """Dev loss (and dev ROUGE-L when configured); best/ follows the best score."""
        cfg, acc, state = self.cfg, self.acc, self.state
        if not self.dev_enc and not (cfg.dev_eval.num_examples and self.dev_examples):
            return
        t0 = time.perf_counter()
        answers: list[dict[str, Any]] = []
        metrics = evaluate_dev(
            self.module,
            self.teacher,
            self.tokenizer,
            cfg,
            self.dev_enc,
            self.dev_examples,
            self.spec,
            acc,
            self.student,
            self.store,
            answers,
        )
        key = metrics.get("dev_rougeL", -metrics.get("dev_loss", float("nan")))
        improved = state["best_metric"] is None or key > state["best_metric"]
        state["last_eval"] = {"step": step, **metrics}
        state.setdefault("first_eval", state["last_eval"])
        if improved:
            state.update(best_metric=key, best_step=step)
        weights = self._full_weights(improved)  # collective
        state["dev_eval_s"] = state.get("dev_eval_s", 0.0) + time.perf_counter() - t0
        elapsed = self.tick()
        if acc.is_main_process:
            # elapsed_s: the stage's clock when this score was known (the evaluation's own time in it)
            append_jsonl(self.dirs.eval_log, [{"step": step, **metrics, "elapsed_s": round(elapsed, 3)}])
            if answers:  # each dev answer and its score: to read, and for paired tests between checkpoints
                atomic_write_text(
                    self.dirs.dev_answers(step), "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
                )
            for k, v in metrics.items():
                self.writer.add_scalar(f"dev/{k}", v, step)
            if improved:
                save_model_dir(self._trained_student(), self.tokenizer, self.dirs.best, weights)
                atomic_write_json(self.dirs.best / "metrics.json", {"step": step, **metrics})
        msg = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
        acc.print(f"[{self.desc}] step {step}: {msg}")

    def _sample_on_policy(
        self, step: int, micro: list[list[int]], flags: list[bool]
    ) -> tuple[list[tuple[list[Encoded], bool]], float]:
        """This process's micro-batches of the step, the flagged ones answered by the student
        itself (GKD), all in one decoding stream; and the seconds that took."""
        cfg, acc = self.cfg, self.acc
        mine = list(range(len(micro)))[acc.process_index :: acc.num_processes]
        gen_s = 0.0
        # FSDP: gathering is collective, so every process gathers when any micro-batch of the step samples
        gen_ctx = (
            decoding_model(self.module, self.student, acc.device, cfg, acc) if any(flags) else contextlib.nullcontext()
        )
        with gen_ctx as gen_model:
            groups = {g: [self.enc[i] for i in micro[g]] for g in mine}
            sampled = [g for g in mine if flags[g]]
            if sampled:
                tg = time.perf_counter()
                op = cfg.on_policy
                rows = [e for g in sampled for e in groups[g]]
                seeds = [s for g in sampled for s in row_seeds(cfg.seed * 1_000_003 + step * 1_009 + g, len(groups[g]))]
                answers = iter(
                    sample_responses(
                        gen_model,
                        self.tokenizer,
                        rows,
                        max_new_tokens=op.max_new_tokens,
                        temperature=op.temperature,
                        top_k=op.top_k,
                        top_p=op.top_p,
                        seeds=seeds,
                        max_len=cfg.data.max_len,
                        batch_size=max(cfg.generation.batch_size, cfg.train.batch_size),
                    )
                )
                for g in sampled:
                    groups[g] = [next(answers) for _ in groups[g]]
                gen_s += time.perf_counter() - tg
            return [(groups[g], flags[g]) for g in mine], gen_s

    def _backward(self, local: list[tuple[list[Encoded], bool]], denominator: float) -> tuple[float, float, int]:
        """Forward and backward over this process's micro-batches; (CE sum, KD sum, tokens)."""
        acc, module, device = self.acc, self.module, self.acc.device
        ce_sum = kd_sum = 0.0
        n_tokens = 0
        for j, (encs, on_policy) in enumerate(local):
            batch = {k: v.to(device) for k, v in collate(encs, pad_id(self.tokenizer)).items()}
            n_tokens += int(batch["attention_mask"].sum())
            sync = j == len(local) - 1
            ctx = acc.no_sync(module) if not (sync or self.sharded or self.deepspeed) else contextlib.nullcontext()
            store = self.store
            cached = store.rows(encs, device, self.tau) if store is not None and not on_policy else None
            if self.deepspeed:  # the step's last micro-batch reduces the gradients and steps (clipping included)
                module.set_gradient_accumulation_boundary(sync)
            with ctx:
                loss, sums = _micro_loss(module, self.teacher, batch, self.spec, acc, denominator, on_policy, cached)
                if self.deepspeed:
                    module.backward(loss, scale_wrt_gas=False)  # the loss is already divided by the step's tokens
                    module.step()
                else:
                    acc.backward(loss)
            ce_sum += sums.ce.item()
            kd_sum += sums.kd.item()
        return ce_sum, kd_sum, n_tokens

    def _optimizer_step(self) -> float | None:
        """Clip, step and zero the gradients (the DeepSpeed engine did it in _backward); the norm."""
        tcfg = self.cfg.train
        if self.deepspeed:
            return self.module.get_global_grad_norm() if tcfg.grad_clip else None
        grad_norm = None
        if tcfg.grad_clip:
            clip = torch.nn.utils.clip_grad_norm_ if self.sharded else self.acc.clip_grad_norm_
            grad_norm = clip(self.module.parameters(), tcfg.grad_clip)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm  # FSDP
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def train_step(self, step: int) -> dict[str, Any]:
        """One optimizer step (0-based `step`); returns its log row."""
        acc, state, device = self.acc, self.state, self.acc.device
        t0 = time.perf_counter()
        micro = self.plan.step_batches(step)
        flags = on_policy_flags(self.cfg.seed, step, len(micro), self.ratio)
        local, gen_s = self._sample_on_policy(step, micro, flags)
        if self.ratio > 0:  # sampled answers change the step's target count: count it over all processes
            mine_targets = sum(e.n_loss_targets for encs, _ in local for e in encs)
            denominator = float(acc.reduce(torch.tensor([float(mine_targets)], device=device), reduction="sum").item())
        else:
            denominator = float(sum(self.n_targets[i] for b in micro for i in b))
        ce_sum, kd_sum, n_tokens = self._backward(local, denominator)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._optimizer_step()
        self.scheduler.step()
        totals = acc.reduce(torch.tensor([ce_sum, kd_sum, float(n_tokens)], device=device), reduction="sum")
        ce_sum, kd_sum, n_tokens = totals.tolist()
        dt = time.perf_counter() - t0
        state["tokens"] += int(n_tokens)
        state["generation_s"] += gen_s
        self.tick()
        done_steps = step + 1
        row = {
            "step": done_steps,
            "epoch": round(done_steps / self.plan.steps_per_epoch, 4),
            "loss": (self.alpha * ce_sum + (1 - self.alpha) * self.spec.kd_scale * kd_sum) / max(denominator, 1),
            "ce": ce_sum / max(denominator, 1),
            "kd": kd_sum / max(denominator, 1),
            "lr": lr,
            "grad_norm": float(grad_norm) if grad_norm is not None else None,
            "tokens_per_s": n_tokens / dt,
            "tau": self.tau,
            "alpha": self.alpha,
            "elapsed_s": round(state["elapsed_s"], 3),
        }
        if self.ratio > 0:
            row["on_policy_batches"] = sum(flags)
            row["generation_s"] = round(gen_s, 3)
        log_every = self.cfg.train.log_every
        if acc.is_main_process and (done_steps % log_every == 0 or done_steps == self.plan.total_steps):
            append_jsonl(self.dirs.train_log, [row])
            for k in ("loss", "ce", "kd", "lr", "tokens_per_s"):
                self.writer.add_scalar(f"train/{k}", row[k], done_steps)
        return row

    def finish(self, final_step: int) -> StageSummary:
        """The stage's summary; when it is complete, final/ and done.json. The caller's student
        holds the trained weights afterwards (also under FSDP)."""
        acc, state, dirs = self.acc, self.state, self.dirs
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
        lcfg = self.cfg.loss
        self.tick()  # the last evaluation and checkpoint count too
        summary: StageSummary = {
            "complete": final_step >= self.plan.total_steps,
            "steps": final_step,
            "total_steps": self.plan.total_steps,
            "steps_per_epoch": self.plan.steps_per_epoch,
            "examples": len(self.enc),
            "tau": self.tau,
            "alpha": self.alpha,
            "divergence": lcfg.divergence,
            "kd_scale": self.spec.kd_scale,
            "wall_time_s": round(state["elapsed_s"], 3),
            "dev_eval_s": round(state.get("dev_eval_s", 0.0), 3),
            "generation_s": round(state.get("generation_s", 0.0), 3),
            "teacher_cache_s": round(self.cache_s, 3),
            "on_policy_ratio": self.ratio,
            "tokens": state["tokens"],
            "best_metric": state["best_metric"],
            "first_eval": state.get("first_eval"),
            "last_eval": state.get("last_eval"),
            "best_step": state["best_step"],
        }
        if summary["complete"]:
            weights = self._full_weights()  # collective
            if acc.is_main_process:
                if state["best_step"] == final_step and (dirs.best / "config.json").exists():
                    ckpt.link_model_dir(dirs.best, dirs.final)  # the same weights: one copy on disk
                else:
                    save_model_dir(self._trained_student(), self.tokenizer, dirs.final, weights)
                atomic_write_json(dirs.done, summary)
        acc.wait_for_everyone()
        if self.sharded:  # the caller's student continues from the trained weights, as under DDP
            final = dirs.final if summary["complete"] else ckpt.latest_checkpoint(self.dirs.checkpoints)
            ckpt.load_weights(self.student, final)
        if (
            self.deepspeed
        ):  # drop the engine: its gradient hooks on the student's parameters and its optimizer partitions
            acc.free_memory()
        if summary["complete"] and self.cfg.train.keep_last == 0 and acc.is_main_process:
            shutil.rmtree(self.dirs.checkpoints, ignore_errors=True)  # done.json and final/ stand for the stage now
        return summary
