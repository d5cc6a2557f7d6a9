"""SRD for Hugging Face `datasets` and any `transformers.Trainer`: reflection on a Dataset, and
the Baby-Step curriculum fed to a Trainer in order, with each stage's tau and alpha.

    args = SomeConfig(..., num_train_epochs=1, train_sampling_strategy="sequential")
    rows, curriculum = prepare_curriculum(train_ds, args=args, student=model, tokenizer=tok,
                                          out_dir="runs/my-reflection")
    trainer = SomeTrainer(..., args=args, train_dataset=rows)
    curriculum.attach(trainer)     # checks the trainer; sets srd_tau / srd_alpha per stage and logs them
    trainer.train()

The curriculum is an explicit order of rows: for stage i, `epochs_per_stage` passes over the
kept examples of stages 1..i, each pass shuffled with a seed of its own, so the trainer only has
to read the data in order (a sequential sampler; `num_train_epochs=1`). Each stage's rows are cut
to a multiple of the optimizer step's batch (at most batch - 1 rows dropped at a stage's end,
like `drop_last`), so that a stage boundary is an optimizer step and no step mixes two stages'
temperatures. Resuming from a trainer checkpoint works as for any ordered data: the trainer
skips the rows its finished steps consumed, and the callback derives the stage from the step.

Which trainers honour tau and alpha is the trainer's business (`srd.integrations.trl`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from srd.config import CurriculumConfig, RunConfig, load_config, with_overrides
from srd.curriculum import stage_alphas, stage_taus
from srd.data.example import DataError, Example, conversation_parts, message_text

log = logging.getLogger(__name__)


def _text(value: Any, tokenizer: Any, *, prompt: bool) -> str:
    """A prompt or completion cell as text: a string as it is; a list of chat messages through
    the tokenizer's chat template (a prompt ends with the generation prompt) or, for a
    completion, the content of its messages."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value):
        messages = [{**m, "content": message_text(m)} for m in value]
        if not prompt:
            return "".join(m["content"] for m in messages)
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise DataError("conversational rows need a tokenizer with a chat template to render their prompt")
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise DataError(f"expected text or a list of chat messages, got {type(value).__name__}")


def examples_from_dataset(
    dataset: Any,
    tokenizer: Any = None,
    *,
    id_column: str | None = None,
    references: dict[str, str] | None = None,
) -> list[Example]:
    """srd Examples from a `datasets.Dataset` in one of the formats TRL's trainers take:

    - prompt / completion (text, or lists of chat messages): the prompt is used as it is
      (`data.prompt_format=plain`), a conversational one rendered with the chat template;
    - prompt only (DistillationTrainer's format), with `references` (row id -> a reference
      answer, e.g. the teacher's: reflect_dataset(..., teacher=...) makes them; a row whose
      reference is empty is left out);
    - messages (a conversation): everything before the last assistant message is the prompt;
    - instruction / input / output (Alpaca-style; reflect with the `alpaca` prompt format).

    Ids come from `id_column` when given, else the row index."""
    if not hasattr(dataset, "__len__"):
        raise DataError(
            "a streaming (iterable) dataset: reflection ranks every row, so it needs them all; load it with "
            "streaming=False, or take the rows you train on (Dataset.from_list(list(dataset.take(n))))"
        )
    columns = set(dataset.column_names)
    examples = []
    for i, row in enumerate(dataset):
        where = f"dataset row {i}"
        ex_id = str(row[id_column]) if id_column else str(i)
        try:
            if {"prompt", "completion"} <= columns:
                ex = Example(
                    id=ex_id,
                    instruction=_text(row["prompt"], tokenizer, prompt=True),
                    output=_text(row["completion"], tokenizer, prompt=False),
                )
            elif is_prompt_only(dataset):
                if references is None:
                    raise DataError(
                        "a prompt-only row has no reference answer to score the student against: pass the "
                        "teacher (reflect_dataset(..., teacher=teacher)), whose answers become the references"
                    )
                if ex_id not in references:
                    raise DataError(f"no reference answer for id {ex_id!r}")
                ex = Example(
                    id=ex_id, instruction=_text(row["prompt"], tokenizer, prompt=True), output=references[ex_id]
                )
            elif "messages" in columns:  # the file readers' rule: the last assistant message is the reference
                parts = conversation_parts({"messages": row["messages"]}, require_output=True)
                if parts is None:
                    raise DataError("the conversation has no messages")
                prompt, output = parts
                ex = Example(id=ex_id, instruction=_text(prompt, tokenizer, prompt=True), output=output)
            elif {"instruction", "output"} <= columns:
                ex = Example(
                    id=ex_id, instruction=row["instruction"], input=row.get("input") or "", output=row["output"]
                )
            else:
                raise DataError(
                    f"columns {sorted(columns)}: expected prompt/completion, messages, or instruction/output"
                )
        except DataError as e:
            raise DataError(f"{where}: {e}") from None
        if references is not None and ex.instruction.strip() and not ex.target.strip():
            continue  # an empty reference (the teacher said nothing): nothing to score against, left out
        if not ex.instruction.strip() or not ex.target.strip():
            raise DataError(f"{where}: an empty prompt or completion; drop the row or fill it in")
        examples.append(ex)
    if len({e.id for e in examples}) != len(examples):
        raise DataError(f"id column {id_column!r} repeats a value: ids must be unique")
    return examples


def is_prompt_only(dataset: Any) -> bool:
    """A prompt column and nothing to learn from (DistillationTrainer's own format)."""
    columns = set(dataset.column_names)
    return "prompt" in columns and not columns & {"completion", "messages", "output"}


def teacher_references(
    dataset: Any,
    *,
    teacher: Any,
    tokenizer: Any,
    out_dir: Path,
    cfg: RunConfig,
    id_column: str | None = None,
    progress: bool = True,
) -> dict[str, str]:
    """The teacher's answer to every prompt of a prompt-only dataset (decoded as reflection
    decodes: the `generation` settings, greedy by default), row id -> text. Saved as they finish
    in out_dir/teacher_references.jsonl and reused by a rerun (keyed on the teacher's weights and
    the decoding settings in teacher_references.meta.json)."""
    from srd.data.prompts import encode_prompt
    from srd.generation.decode import iter_responses
    from srd.generation.decoding import Decoding
    from srd.models.features import model_fingerprint
    from srd.utils import append_jsonl, atomic_write_json, drop_torn_tail, read_json, read_jsonl

    g, mp = cfg.generation, cfg.data.max_prompt_len
    meta = {"teacher": model_fingerprint(teacher), "generation": dataclasses.asdict(g), "max_prompt_len": mp}
    meta_path, rows_path = out_dir / "teacher_references.meta.json", out_dir / "teacher_references.jsonl"
    out_dir.mkdir(parents=True, exist_ok=True)
    if meta_path.exists() and read_json(meta_path) != meta:
        raise ValueError(
            f"{rows_path} holds another teacher's answers, or answers decoded with other settings: give "
            "reflect_dataset another out_dir (or move that folder away)"
        )
    atomic_write_json(meta_path, meta)
    drop_torn_tail(rows_path)  # appended as they finish: a row a kill tore is decoded again
    done = {r["id"]: r["reference"] for r in read_jsonl(rows_path, missing_ok=True)}
    prompts = []
    for i, row in enumerate(dataset):
        try:
            prompts.append((str(row[id_column]) if id_column else str(i), _text(row["prompt"], tokenizer, prompt=True)))
        except DataError as e:
            raise DataError(f"dataset row {i}: {e}") from None
    todo = [(i, p) for i, p in prompts if i not in done]
    if todo:
        from tqdm.auto import tqdm

        encoded = [encode_prompt(tokenizer, Example(id=i, instruction=p, output=""), "plain", mp) for i, p in todo]
        bar = tqdm(total=len(todo), desc="teacher references", unit="ex", disable=not progress)
        answers = iter_responses(teacher, tokenizer, encoded, Decoding.of(g, static_cache_len=mp + g.max_new_tokens))
        for j, text in answers:
            append_jsonl(rows_path, [{"id": todo[j][0], "reference": text}])
            done[todo[j][0]] = text
            bar.update(1)
        bar.close()
    return {i: done[i] for i, _ in prompts}  # in dataset order


def _claim_reflection_folder(out_dir: Path) -> None:
    """reflect_dataset writes only into a new or empty folder, one srd marked, or one an older srd
    reflected into (its meta.json): never among a user's own files."""
    from srd.utils import claim_folder

    claim_folder(
        out_dir,
        "reflection",
        legacy=(out_dir / "meta.json").is_file(),
        how=None,
        label="out_dir",
        choose="choose a new or empty folder for the reflection",
    )


def reflect_dataset(
    dataset: Any,
    *,
    student: Any,
    tokenizer: Any,
    out_dir: str | Path,
    config: str | Path | RunConfig | None = None,
    overrides: Sequence[str] = (),
    id_column: str | None = None,
    progress: bool = True,
    teacher: Any = None,
) -> Any:
    """Selective reflection on a `datasets.Dataset`: the student answers every prompt, the
    examples are scored (ROUGE-L and CE by default), fused and split into stages, and the
    dataset comes back with the columns srd_rouge_l, srd_ce, srd_fused, srd_position (1 =
    easiest), srd_kept and srd_stage (0 = dropped). Resumable: rerun with the same `out_dir`.

    A prompt-only dataset (DistillationTrainer's format) needs `teacher`: its answers to the
    prompts are the references the student is scored against (teacher_references), and come
    back as the column srd_reference.

    `config`: a YAML recipe or RunConfig for the reflect/curriculum/generation settings
    (default: srd's defaults with `data.prompt_format=plain` for prompt/completion data);
    `overrides`: `key=value` strings on top."""
    import os

    from srd.utils import folder_locks, lock_folder

    _claim_reflection_folder(Path(out_dir))
    with folder_locks():  # the folder is this call's until it returns
        if int(os.environ.get("RANK", "0")) == 0:  # one lock per job: its other processes write in it too
            lock_folder(Path(out_dir), "reflection folder")
        return _reflect_dataset(
            dataset, student=student, tokenizer=tokenizer, out_dir=out_dir, config=config, overrides=overrides,
            id_column=id_column, progress=progress, teacher=teacher,
        )  # fmt: skip


def _reflect_dataset(
    dataset: Any,
    *,
    student: Any,
    tokenizer: Any,
    out_dir: str | Path,
    config: str | Path | RunConfig | None,
    overrides: Sequence[str],
    id_column: str | None,
    progress: bool,
    teacher: Any,
) -> Any:
    from srd.reflect.reflect import reflect
    from srd.runtime import make_accelerator

    prompt_only = is_prompt_only(dataset) and teacher is not None  # the teacher's answers become the references
    if not prompt_only:
        examples = examples_from_dataset(dataset, tokenizer, id_column=id_column)  # first: a bad dataset is one line
    columns = set(dataset.column_names)
    fmt = "alpaca" if {"instruction", "output"} <= columns and "prompt" not in columns else "plain"
    if isinstance(config, RunConfig):
        cfg = with_overrides(config, overrides)
        if cfg.data.prompt_format != fmt:
            seen = "in the Alpaca template" if fmt == "alpaca" else "as they are (chat ones through the chat template)"
            raise ValueError(
                f"the RunConfig's data.prompt_format is {cfg.data.prompt_format!r}, but the trainer sees these rows' "
                f"prompts {seen}: "
                f"reflection would rank answers to other prompts than the ones trained on; set "
                f"data.prompt_format={fmt} (overrides=['data.prompt_format={fmt}'])"
            )
    else:
        cfg = load_config(config, [f"data.prompt_format={fmt}", *overrides])
    from accelerate.state import AcceleratorState, is_initialized

    references: dict[str, str] = {}
    if prompt_only:
        references = teacher_references(
            dataset, teacher=teacher, tokenizer=tokenizer, out_dir=Path(out_dir), cfg=cfg, id_column=id_column,
            progress=progress,
        )  # fmt: skip
        examples = examples_from_dataset(dataset, tokenizer, id_column=id_column, references=references)
    cfg = _as_the_trainer_runs(cfg)
    ours = not is_initialized()
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    try:
        manifest = reflect(
            cfg,
            student=student,
            tokenizer=tokenizer,
            examples=examples,
            out_dir=Path(out_dir),
            accelerator=acc,
            progress=progress,
        )
    finally:
        if ours:  # leave accelerate as found: the trainer made next sets its own mixed precision
            AcceleratorState._reset_state()
    by_id = {r["id"]: r for r in manifest}
    ids = list(references) if prompt_only else [e.id for e in examples]  # every row, in dataset order
    left_out = [i for i in ids if i not in by_id]  # prompt-only rows whose reference answer is empty
    for n, i in enumerate(left_out, start=len(manifest) + 1):
        by_id[i] = {"scores": {}, "fused": float("nan"), "position": n, "kept": False, "stage": 0}
    if left_out:
        log.warning("%d of the teacher's answers are empty: those rows are left out (srd_stage 0)", len(left_out))
    rows = [by_id[i] for i in ids]
    columns = {
        "srd_rouge_l": [float(r["scores"].get("rouge_l", float("nan"))) for r in rows],
        "srd_ce": [float(r["scores"].get("ce", float("nan"))) for r in rows],
        "srd_fused": [float(r["fused"]) for r in rows],
        "srd_position": [int(r["position"]) for r in rows],
        "srd_kept": [bool(r["kept"]) for r in rows],
        "srd_stage": [int(r["stage"] or 0) for r in rows],
    }
    if prompt_only:
        columns["srd_reference"] = [references[i] for i in ids]
    out = dataset
    for name, values in columns.items():
        if name in out.column_names:
            out = out.remove_columns(name)
        out = out.add_column(name, values)
    return out


def _help(text: str) -> dict[str, Any]:
    return {"metadata": {"help": text}}


@dataclass
class SRDConfig:
    """SRD's settings the way TRL's are set: a dataclass that `transformers.HfArgumentParser` and
    `trl.TrlParser` read from the command line or a YAML file beside the trainer's own config
    (`TrlParser((ScriptArguments, GKDConfig, ModelConfig, SRDConfig))`). Every field starts with
    `srd_`, so none collides with a trainer's (GKD has its own `temperature`, `beta`,
    `max_new_tokens`). `prepare_curriculum(..., srd=SRDConfig(...))` applies it."""

    srd_reflection_dir: str = field(
        default="srd-reflection", **_help("folder of the reflection (resumable: rerun with the same folder)")
    )
    srd_keep_ratio: float = field(default=0.75, **_help("share of the rows kept, easiest first (the paper's lambda)"))
    srd_num_stages: int = field(default=3, **_help("curriculum stages, easy -> hard (the paper's n)"))
    srd_epochs_per_stage: float = field(default=8.0, **_help("passes over stages 1..i in stage i"))
    srd_tau_start: float = field(default=1.0, **_help("KD temperature of the first stage"))
    srd_tau_end: float = field(default=2.0, **_help("KD temperature of the last stage"))
    srd_alpha_start: float = field(default=0.3, **_help("CE weight of the first stage"))
    srd_alpha_end: float = field(default=0.1, **_help("CE weight of the last stage"))
    srd_scorers: list[str] = field(
        default_factory=lambda: ["rouge_l", "ce"], **_help("difficulty signals fused by reciprocal rank fusion")
    )
    srd_rrf_k: float = field(default=60.0, **_help("k of reciprocal rank fusion, sum 1 / (k + rank)"))
    srd_max_new_tokens: int = field(default=128, **_help("length cap of the student's answers in reflection"))
    srd_generation_batch_size: int = field(default=16, **_help("answers generated at once in reflection"))
    srd_overrides: list[str] = field(
        default_factory=list, **_help("any other srd setting as key=value (srd config --reference lists them)")
    )

    def curriculum(self) -> CurriculumConfig:
        """The CurriculumConfig of these settings (the trainer's own learning-rate schedule)."""
        return CurriculumConfig(
            num_stages=self.srd_num_stages,
            epochs_per_stage=self.srd_epochs_per_stage,
            tau_start=self.srd_tau_start,
            tau_end=self.srd_tau_end,
            alpha_start=self.srd_alpha_start,
            alpha_end=self.srd_alpha_end,
            lr_schedule="global",
        )

    def overrides(self) -> list[str]:
        """The reflection's settings as srd config overrides."""
        return [
            f"reflect.keep_ratio={self.srd_keep_ratio}",
            f"reflect.scorers=[{', '.join(self.srd_scorers)}]",
            f"reflect.rrf_k={self.srd_rrf_k}",
            f"generation.max_new_tokens={self.srd_max_new_tokens}",
            f"generation.batch_size={self.srd_generation_batch_size}",
            *self.srd_overrides,
        ]


def _as_the_trainer_runs(cfg: RunConfig) -> RunConfig:
    """A trainer's config made before reflection (TRL scripts parse theirs first) has set up
    accelerate in this process with its own mixed precision, which cannot change any more:
    reflect in that precision (and so in the precision the trainer will train in)."""
    from accelerate.state import AcceleratorState, is_initialized

    if not is_initialized():
        return cfg
    precision = "bf16" if AcceleratorState().mixed_precision == "bf16" else "fp32"
    return cfg if cfg.train.precision == precision else with_overrides(cfg, [f"train.precision={precision}"])


def prepare_curriculum(
    dataset: Any,
    *,
    args: Any,
    student: Any,
    tokenizer: Any,
    out_dir: str | Path | None = None,
    srd: SRDConfig | None = None,
    curriculum: CurriculumConfig | None = None,
    overrides: Sequence[str] = (),
    id_column: str | None = None,
    progress: bool = True,
) -> tuple[Any, Curriculum]:
    """Reflection and the curriculum in one call, from the trainer's own arguments: returns the
    rows in training order (give them to the trainer as `train_dataset`) and the Curriculum
    (then `curriculum.attach(trainer)`). The reflection splits into the curriculum's number of
    stages; the plan's rows per step and shuffling seed come from `args`. Resumable: rerun
    with the same `out_dir`. `srd`: an SRDConfig (its curriculum, reflection settings and
    folder), instead of `curriculum` and `out_dir`."""
    if srd is not None:
        if curriculum is not None:
            raise ValueError("give srd=SRDConfig(...) or curriculum=CurriculumConfig(...), not both")
        curriculum, overrides = srd.curriculum(), [*srd.overrides(), *overrides]
        out_dir = out_dir if out_dir is not None else srd.srd_reflection_dir
    if out_dir is None:
        raise ValueError("give out_dir= (the reflection's folder) or srd=SRDConfig(srd_reflection_dir=...)")
    c = curriculum or CurriculumConfig(lr_schedule="global")
    reflected = reflect_dataset(
        dataset,
        student=student,
        tokenizer=tokenizer,
        out_dir=out_dir,
        overrides=[f"curriculum.num_stages={c.num_stages}", *overrides],
        id_column=id_column,
        progress=progress,
    )
    plan = Curriculum.from_reflected(reflected, args=args, curriculum=c, seed=int(getattr(args, "seed", 0)))
    return plan.dataset(reflected), plan


@dataclass(frozen=True)
class Curriculum:
    """The Baby-Step order of a reflected dataset's rows and each stage's tau and alpha.

    order: dataset row indices, in training order; stage_steps: optimizer steps of each stage
    (its rows / batch_size); taus, alphas: per stage; positions: each dataset row's
    srd_position (the reflection's easy -> hard rank), with which a trainer's dataset is checked
    to hold the rows in this order (empty: not checked)."""

    order: tuple[int, ...]
    stage_steps: tuple[int, ...]
    taus: tuple[float, ...]
    alphas: tuple[float, ...]
    batch_size: int
    positions: tuple[int, ...] = field(default=(), compare=False, repr=False)

    @classmethod
    def from_reflected(
        cls,
        dataset: Any,
        *,
        args: Any = None,
        batch_size: int | None = None,
        curriculum: CurriculumConfig | None = None,
        seed: int = 0,
    ) -> Curriculum:
        """The curriculum of a dataset returned by `reflect_dataset`, for a trainer with these
        `args` (its TrainingArguments / GKDConfig / SFTConfig ...: the rows an optimizer step
        consumes are read from them, `rows_per_step`), or for `batch_size` rows per step over
        all processes. `curriculum` (default: CurriculumConfig(lr_schedule="global")) must have
        the reflection's number of stages."""
        if (args is None) == (batch_size is None):
            raise ValueError("give the trainer's arguments (args=...) or the rows per optimizer step (batch_size=...)")
        if "srd_stage" not in dataset.column_names:
            raise ValueError("the dataset has no srd_stage column: pass it through reflect_dataset first")
        c = curriculum or CurriculumConfig(lr_schedule="global")
        stages = np.asarray(dataset["srd_stage"])
        reflected = int(stages.max(initial=0))
        if reflected != c.num_stages:
            raise ValueError(
                f"the dataset was reflected into {reflected} stages and the curriculum has num_stages={c.num_stages}: "
                f"use CurriculumConfig(num_stages={reflected}), or reflect again with "
                f"overrides=['curriculum.num_stages={c.num_stages}']"
            )
        positions = np.asarray(dataset["srd_position"])
        rows = rows_per_step(args) if batch_size is None else batch_size
        return cls.from_stages(stages, positions, c, batch_size=rows, seed=seed)

    @classmethod
    def from_stages(
        cls, stages: np.ndarray, positions: np.ndarray, c: CurriculumConfig, *, batch_size: int, seed: int = 0
    ) -> Curriculum:
        """From per-row stage numbers (0 = dropped) and curriculum positions: pure, no model."""
        if batch_size < 1:
            raise ValueError("batch_size must be >= 1")
        _check_applicable(c)
        rng = np.random.default_rng(seed)
        order: list[int] = []
        steps: list[int] = []
        for i in range(1, c.num_stages + 1):
            pool = np.flatnonzero((stages >= 1) & (stages <= i))
            pool = pool[np.argsort(positions[pool], kind="stable")]  # easy -> hard, then shuffled per pass
            if len(pool) == 0:
                raise ValueError(f"curriculum stage {i} has no examples: keep more data or use fewer stages")
            whole, part = divmod(c.epochs_per_stage, 1)
            rows = [int(x) for _ in range(int(whole)) for x in rng.permutation(pool)]
            rows += [int(x) for x in rng.permutation(pool)[: int(round(part * len(pool)))]]
            n = len(rows) // batch_size * batch_size  # whole optimizer steps: no step spans two stages
            if n == 0:
                raise ValueError(
                    f"curriculum stage {i} has {len(rows)} rows, fewer than one optimizer step of {batch_size}"
                )
            order += rows[:n]
            steps.append(n // batch_size)
        known = tuple(int(p) for p in positions)
        return cls(tuple(order), tuple(steps), tuple(stage_taus(c)), tuple(stage_alphas(c)), batch_size, known)

    def dataset(self, reflected: Any) -> Any:
        """The rows in training order (train it for one epoch, read sequentially)."""
        return reflected.select(list(self.order))

    def stage_at(self, step: int) -> int:
        """The 1-based stage that optimizer step `step` (0-based) belongs to."""
        edge = 0
        for i, n in enumerate(self.stage_steps, start=1):
            edge += n
            if step < edge:
                return i
        return len(self.stage_steps)

    @property
    def total_steps(self) -> int:
        return sum(self.stage_steps)

    @property
    def fingerprint(self) -> str:
        """A digest of the plan (order, stage steps, tau, alpha, rows per step)."""
        plan = [list(self.order), list(self.stage_steps), list(self.taus), list(self.alphas), self.batch_size]
        return hashlib.sha256(json.dumps(plan).encode()).hexdigest()[:16]

    @property
    def rows(self) -> tuple[int, ...]:
        """The distinct dataset rows the plan trains on, in dataset order."""
        return tuple(sorted(set(self.order)))

    def distinct_dataset(self, reflected: Any) -> Any:
        """Each row the plan trains on once (`rows`): give it to a trainer that tokenises its
        dataset when it is built (SFTTrainer) and attach with `expand=True`, so that every row is
        tokenised once, not once per pass of the plan (about 12x with the paper's settings)."""
        return reflected.select(list(self.rows))

    def attach(self, trainer: Any, *, expand: bool = False) -> CurriculumCallback:
        """Add the callback that sets `trainer.srd_tau` / `trainer.srd_alpha` (and the
        temperature of a trainer whose loss reads it) at every step, and logs stage, tau and
        alpha. Refuses (ValueError, with the fix) every trainer setting that would reorder,
        drop or repeat the plan's rows, or leave its tau or alpha unread (`check_trainer`).

        `expand=True`: the trainer was given `distinct_dataset(reflected)` and has prepared
        (tokenised) it; its prepared rows are put in the plan's order here (a `select`, no copy)."""
        handler = getattr(trainer, "callback_handler", None)
        if any(isinstance(c, CurriculumCallback) for c in getattr(handler, "callbacks", [])):
            raise ValueError(
                "this trainer already has a curriculum attached: two would each set tau and alpha at every step "
                "(and expand=True would reorder its rows twice); attach one curriculum to one trainer"
            )
        if expand:
            data = getattr(trainer, "train_dataset", None)
            if data is None or not hasattr(data, "select"):
                raise ValueError("expand=True needs the trainer's train_dataset to be a datasets.Dataset")
            if len(data) != len(self.rows):
                raise ValueError(
                    f"expand=True: the trainer's dataset has {len(data)} rows and the plan trains on {len(self.rows)} "
                    "distinct rows: give the trainer curriculum.distinct_dataset(reflected), and keep rows that fit "
                    "its max_length (its preparation dropped or added rows)"
                )
            at = {row: i for i, row in enumerate(self.rows)}
            trainer.train_dataset = data.select([at[i] for i in self.order])
        check_trainer(self, trainer)
        cb = CurriculumCallback(self, trainer)
        trainer.add_callback(cb)
        trainer.add_callback(SRDPlanRecord(self.fingerprint))  # the plan, in every checkpoint's trainer_state.json
        cb.apply(trainer.state.global_step)
        return cb


def rows_per_step(args: Any, data_parallel: int | None = None) -> int:
    """Rows one optimizer step consumes over all processes, from a trainer's arguments:
    per-device batch x the GPUs one process drives (DataParallel, `n_gpu`) x gradient
    accumulation x the data-parallel processes (`data_parallel`, default all of `world_size`:
    a trainer with tensor, context or sequence parallelism has fewer, data_parallel_size). Under
    accelerate's `split_batches` the per-device batch is the whole batch, split among the
    processes, so the processes do not multiply it."""
    world = int(getattr(args, "world_size", 1) or 1) if data_parallel is None else data_parallel
    per_process = int(args.per_device_train_batch_size) * _n_gpu(args) * int(args.gradient_accumulation_steps)
    return per_process if _split_batches(args) else per_process * world


def _n_gpu(args: Any) -> int:
    """GPUs one process drives (DataParallel); 1 on a CPU."""
    return max(1, int(getattr(args, "n_gpu", 1) or 1))


def _split_batches(args: Any) -> bool:
    """accelerate's split_batches: the processes share one batch instead of each reading its own."""
    return bool(getattr(getattr(args, "accelerator_config", None), "split_batches", False))


def data_parallel_size(trainer: Any) -> int:
    """The processes that each read their own rows: world_size over the trainer's tensor, context
    and sequence parallel sizes (transformers' Trainer.get_tp_size / get_cp_size / get_sp_size)."""
    world = int(getattr(trainer.args, "world_size", 1) or 1)
    for name in ("get_tp_size", "get_cp_size", "get_sp_size"):
        size = getattr(trainer, name, None)
        if callable(size):
            world //= max(1, int(size()))
    return max(1, world)


def _check_applicable(c: CurriculumConfig) -> None:
    """Refuse the CurriculumConfig fields a trainer-side curriculum cannot apply."""
    if c.order != "easy_to_hard":
        raise ValueError(
            f"curriculum order={c.order!r} decides which slices the stages hold, which reflection does: pass "
            f"overrides=['curriculum.order={c.order}'] to reflect_dataset and keep the default here"
        )
    if c.lr_schedule != "global":
        raise ValueError(
            "the trainer's own learning-rate schedule runs across all stages (srd run can restart it per stage): "
            "use CurriculumConfig(lr_schedule='global') to say so"
        )
    if c.re_reflect:
        raise ValueError("re-reflection before each stage runs in srd run only: set re_reflect=False")


def _loss_reads_temperature(trainer: Any) -> bool:
    """TRL's DistillationTrainer: its loss reads self.temperature (it has no CE term; GKD's
    `temperature` only samples)."""
    return type(trainer).__name__ == "DistillationTrainer"


def _honours(trainer: Any) -> set[str]:
    """What a trainer's loss reads of the stage: 'tau' and/or 'alpha'."""
    declared = getattr(type(trainer), "srd_honours", None)
    if declared is not None:
        return set(declared)
    return {"tau"} if _loss_reads_temperature(trainer) else set()


def check_trainer(curriculum: Curriculum, trainer: Any) -> None:
    """Refuse (ValueError, with the fix) a trainer that would silently break the plan: read rows
    out of order, drop or repeat some, step with another batch, stop early or late, skip data
    on resume the wrong way, or log a tau or alpha its loss never reads."""
    check_sequential(trainer)
    args, name = trainer.args, type(trainer).__name__
    data_parallel = data_parallel_size(trainer)
    rows = rows_per_step(args, data_parallel)
    if rows != curriculum.batch_size:
        n_gpu = _n_gpu(args)
        how = (
            f"per_device_train_batch_size {args.per_device_train_batch_size}"
            + (f" x {n_gpu} GPUs of DataParallel" if n_gpu > 1 else "")
            + f" x gradient_accumulation_steps {args.gradient_accumulation_steps}"
            + (
                " (split_batches: one batch split among the processes)"
                if _split_batches(args)
                else f" x {data_parallel} processes"
            )
        )
        fix = (
            "build it with Curriculum.from_reflected(..., args=trainer.args)"
            if rows == rows_per_step(args)
            else f"build it with batch_size={rows} (its tensor, context or sequence parallelism leaves "
            f"{data_parallel} of {getattr(args, 'world_size', 1)} processes reading rows)"
        )
        raise ValueError(
            f"the curriculum was planned for {curriculum.batch_size} rows per optimizer step, and this trainer "
            f"consumes {rows} ({how}): {fix}"
        )
    if args.max_steps is not None and args.max_steps > 0 and args.max_steps != curriculum.total_steps:
        raise ValueError(
            f"max_steps={args.max_steps}, and the curriculum is {curriculum.total_steps} steps: set max_steps=-1 "
            "(a longer run repeats stage 1 at the last tau, a shorter one cuts the later stages)"
        )
    for key, why in (
        ("ignore_data_skip", "a resumed run would read the rows from the first again"),
        ("auto_find_batch_size", "it changes the batch, and so the rows per step, after an out-of-memory error"),
        ("packing", "packing joins rows, which moves every stage boundary"),
    ):
        if getattr(args, key, False):
            raise ValueError(f"set {key}=False: {why}")
    if getattr(args, "dataloader_in_order", True) is False and getattr(args, "dataloader_num_workers", 0):
        raise ValueError(
            "set dataloader_in_order=True: with dataloader workers, False yields batches as they are ready, "
            "out of the curriculum's order"
        )
    data = getattr(trainer, "train_dataset", None)
    if data is not None:
        try:
            n = len(data)
        except TypeError:
            raise ValueError(
                "the trainer's dataset has no length (a streaming or iterable dataset): the curriculum is an order "
                "of rows; materialise it (curriculum.dataset(reflected))"
            ) from None
        if n != len(curriculum.order):
            raise ValueError(
                f"the trainer's dataset has {n} rows and the curriculum {len(curriculum.order)}: the trainer's own "
                "preparation dropped or added rows (a length filter, packing), which moves every stage boundary; "
                "give it curriculum.dataset(reflected) with rows that fit its max_length"
            )
        _check_order(curriculum, data)
    honoured = _honours(trainer)
    if len(set(curriculum.taus)) > 1 or curriculum.taus[0] != 1.0:
        if "tau" not in honoured:
            raise ValueError(
                f"{name}'s loss does not read the stage's tau {list(curriculum.taus)}: use "
                "srd.integrations.trl.SRDGKDTrainer (or TRL's DistillationTrainer), or tau_start=tau_end=1 for a "
                "curriculum of the order alone"
            )
    if any(a != 0.0 for a in curriculum.alphas) and "alpha" not in honoured:
        raise ValueError(
            f"{name}'s loss does not read the stage's alpha {list(curriculum.alphas)}: use "
            "srd.integrations.trl.SRDGKDTrainer, or alpha_start=alpha_end=0"
        )


def _check_order(curriculum: Curriculum, data: Any) -> None:
    """The trainer's rows in the plan's order, where both carry the reflection's srd_position: a
    dataset shuffled, sorted or filtered after `curriculum.dataset(reflected)`, or made from
    another reflection, has the plan's length and would train in silence on another order."""
    if not curriculum.positions or "srd_position" not in (getattr(data, "column_names", None) or ()):
        return
    seen = [int(p) for p in data["srd_position"]]
    want = [curriculum.positions[i] for i in curriculum.order]
    if seen != want:
        k = next(i for i, (a, b) in enumerate(zip(seen, want, strict=True)) if a != b)
        raise ValueError(
            f"the trainer's dataset is not in the curriculum's order: its row {k} is the reflection's row at "
            f"srd_position {seen[k]}, and the plan reads the one at {want[k]} there (stage "
            f"{curriculum.stage_at(k // curriculum.batch_size)}): give the trainer curriculum.dataset(reflected) as "
            "it comes, from the reflection the curriculum was planned on (no shuffle, sort or filter after it)"
        )


def check_sequential(trainer: Any) -> None:
    """Refuse a trainer that would reorder the curriculum's rows or read them more than once."""
    from transformers import Trainer

    args = trainer.args
    if getattr(args, "shuffle_dataset", False):
        raise ValueError("set shuffle_dataset=False in the trainer's config: the curriculum is the order of the rows")
    uses_trainer_sampler = type(trainer)._get_train_sampler is Trainer._get_train_sampler
    strategy = getattr(args, "train_sampling_strategy", "random")
    if uses_trainer_sampler and strategy != "sequential":
        raise ValueError(
            f"set train_sampling_strategy='sequential' (it is {strategy!r}): the curriculum is the order of the rows"
        )
    if (args.max_steps is None or args.max_steps <= 0) and args.num_train_epochs != 1:
        raise ValueError("set num_train_epochs=1: the curriculum already holds every stage's epochs")


def _trainer_callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


def _exportable_state() -> type:
    from transformers.trainer_callback import ExportableState

    return ExportableState


class SRDPlanRecord(_trainer_callback_base(), _exportable_state()):  # type: ignore[misc]
    """The fingerprint of the plan a trainer trains on, kept in every checkpoint's
    trainer_state.json (transformers' stateful callbacks), so a resume reads the plan of the
    very checkpoint it loads, written with it in one file. No hooks: restored by transformers
    (`restore_callback_states_from_checkpoint`), it changes nothing."""

    def __init__(self, fingerprint: str = "") -> None:
        self.fingerprint = fingerprint

    def state(self) -> dict[str, Any]:
        return {"args": {"fingerprint": self.fingerprint}, "attributes": {}}


class CurriculumCallback(_trainer_callback_base()):  # type: ignore[misc]
    """Keeps a trainer at its curriculum stage: tau and alpha before every optimizer step, and
    stage / tau / alpha in every row the trainer logs."""

    def __init__(self, curriculum: Curriculum, trainer: Any) -> None:
        self.curriculum = curriculum
        self.trainer = trainer
        trainer.srd_curriculum_taus = list(curriculum.taus)  # what a teacher store must hold (srd.integrations.trl)
        log = trainer.log

        def log_with_stage(logs: dict[str, Any], *args: Any, **kwargs: Any) -> None:
            logs = {**logs, "srd_stage": trainer.srd_stage, "srd_tau": trainer.srd_tau, "srd_alpha": trainer.srd_alpha}
            return log(logs, *args, **kwargs)

        trainer.log = log_with_stage

    def apply(self, step: int) -> None:
        c, t = self.curriculum, self.trainer
        i = c.stage_at(step)
        t.srd_stage, t.srd_tau, t.srd_alpha = i, c.taus[i - 1], c.alphas[i - 1]
        if _loss_reads_temperature(t):
            t.temperature = t.srd_tau

    PLAN = "srd-plan.json"  # in every checkpoint folder the trainer saves

    def _checkpoint(self, args: Any, step: int) -> Path:
        return Path(args.output_dir) / f"checkpoint-{step}"

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        # what attach checked may have changed since (the trainer's arguments or dataset set after it)
        check_trainer(self.curriculum, self.trainer)
        total = self.curriculum.total_steps
        if state.max_steps != total:  # the trainer's own count, from its dataloader: whatever changed it
            raise ValueError(
                f"the trainer will take {state.max_steps} optimizer steps and the curriculum is {total}: how it "
                "reads the rows (its dataloader, batch or dataset) differs from the plan; attach the curriculum "
                "after the trainer's last change"
            )
        if state.global_step > 0:  # resumed: the checkpoint must have been trained on this very plan
            self._check_resumed(args, state)
        record = SRDPlanRecord.__name__
        if not isinstance(state.stateful_callbacks, dict):
            state.stateful_callbacks = {}
        # what the next checkpoint records (a resumed checkpoint of an older srd has no entry to update)
        state.stateful_callbacks[record] = SRDPlanRecord(self.curriculum.fingerprint).state()
        self.apply(state.global_step)  # a resumed run starts in the stage of its checkpoint

    def _check_resumed(self, args: Any, state: Any) -> None:
        """The resumed checkpoint's plan: its trainer_state.json's record (already loaded into
        `state`), else the srd-plan.json an older srd wrote beside it, else its log."""
        mine = self.curriculum.fingerprint
        recorded = (state.stateful_callbacks or {}).get(SRDPlanRecord.__name__)
        if isinstance(recorded, list):
            recorded = recorded[-1] if recorded else None
        earlier, where = None, f"the checkpoint at step {state.global_step}"
        if isinstance(recorded, dict):
            earlier = recorded.get("args", {}).get("fingerprint")
        else:
            from srd.utils import read_json

            saved = self._checkpoint(args, state.global_step) / self.PLAN
            if saved.exists():
                earlier, where = read_json(saved).get("fingerprint"), str(saved.parent)
        if earlier is not None and earlier != mine:
            raise ValueError(
                f"{where} was trained on another curriculum plan ({earlier}; this one is {mine}): resume with the "
                "same reflection, curriculum, seed and rows per step, or start a new output_dir"
            )
        logged = [r for r in state.log_history if "loss" in r]
        if earlier is None and logged and not any("srd_stage" in r for r in logged):
            raise ValueError(
                f"{where} was trained without a curriculum (none of its logged steps has an srd_stage): resumed "
                "under one, its steps would count as the plan's first ones; start a new output_dir, or resume it "
                "without the curriculum"
            )

    def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        folder = self._checkpoint(args, state.global_step)
        if state.is_world_process_zero and folder.is_dir():
            from srd.utils import atomic_write_json

            c = self.curriculum
            plan = {"fingerprint": c.fingerprint, "stage_steps": list(c.stage_steps), "batch_size": c.batch_size}
            atomic_write_json(folder / self.PLAN, plan)

    def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.apply(state.global_step)
