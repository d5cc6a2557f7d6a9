"""`srd train`: plain KD (or SFT with loss.alpha=1) on one data set, as one stage.

Reads top to bottom: run directory -> models -> data -> train_stage -> summary.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from srd.config import ConfigError, RunConfig, dump_config, is_run_folder, to_dict
from srd.data.example import warn_shared_rows
from srd.data.prompts import check_prompt_format
from srd.data.sources import load_examples, load_mixture, with_instruction_suffix
from srd.models import aligned_vocab_size, check_tokenizers, load_model, load_tokenizer
from srd.models.load import check_model_spec, inference_dtype_of, is_seq2seq
from srd.rundir import RunDir
from srd.runtime import make_accelerator, record_environment
from srd.train.loop import encode_stage_rows, teacher_source_key, train_stage
from srd.train.teacher_store import StoredTeacher, check_store_root, find_source, store_root
from srd.utils import (
    DamagedFileError,
    atomic_write_text,
    claim_folder,
    folder_locks,
    lock_folder,
    remove_stale_temporaries,
)

log = logging.getLogger(__name__)

# Keys that may change between an interrupted run and its resumption.
# train.grad_accum may change with the number of processes (the checkpoint checks that
# processes x grad_accum, the micro-batches per step, stays the same).
RESUME_SAFE_KEYS = {
    "overwrite",
    "allow_code_execution",
    "train.stop_after_steps",
    "train.num_threads",
    "train.eval_every",
    "train.log_every",
    "train.keep_last",  # how many resumable checkpoints stay on disk
    "train.grad_accum",
    "train.sharding",  # checkpoints are stored unsharded: they resume with or without FSDP
    "train.compile",  # the same weights and losses, compiled or not
    "loss.recompute_log_probs",  # the same losses, gradients equal to float32 rounding
}
# Sections that only add work after training (evaluation, the comparison baseline's own run), or
# that only `srd prune` reads.
RESUME_SAFE_PREFIXES = ("eval.", "compare.", "prune.")


def flatten_config(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten_config(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def config_differences(saved: Path, cfg: RunConfig, also: tuple[str, ...] = ()) -> list[str]:
    """How the run config saved in `saved` (a run's config.yaml) differs from `cfg`, as `key: old
    -> new`, leaving out what a resume may change (RESUME_SAFE_KEYS / _PREFIXES) but the keys in
    `also`; [] when the run is this config's. Options added since an older srd saved it count as
    their defaults."""
    try:
        old = flatten_config(yaml.safe_load(saved.read_text(encoding="utf-8")) or {})
    except (yaml.YAMLError, UnicodeDecodeError, AttributeError) as e:
        raise DamagedFileError(
            f"{saved} is damaged ({str(e).splitlines()[0][:120]}); it is the config srd saved for this run: "
            "restore it, or delete the run folder to start over",
            str(e),
        ) from None
    new = flatten_config(to_dict(cfg))
    defaults = flatten_config(to_dict(RunConfig(method=cfg.method)))
    old.update({k: defaults[k] for k in new if k not in old and k in defaults})
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(set(old) | set(new))
        if old.get(k) != new.get(k)
        and (k in also or (k not in RESUME_SAFE_KEYS and not k.startswith(RESUME_SAFE_PREFIXES)))
    ]


def prepare_run_dir(cfg: RunConfig) -> Path:
    """Create the run directory, or check that an existing one belongs to this config."""
    run_dir = cfg.run_dir
    saved = RunDir(run_dir).config
    # srd writes only into a folder it created (or one an older srd wrote: its config.yaml),
    # and removes only its own temporaries there: what a killed run left half-written
    claim_folder(run_dir, "run", overwrite=cfg.overwrite, legacy=is_run_folder(run_dir))
    lock_folder(run_dir, "run folder")  # before its temporaries go: they may be a running process's
    remove_stale_temporaries(run_dir)
    diffs = config_differences(saved, cfg) if saved.exists() else []
    if diffs:
        raise ConfigError(
            f"{run_dir} already holds a run with a different config ({'; '.join(diffs[:6])}). "
            "Resume it with the same config, choose another name=..., or delete the folder to start over."
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved, dump_config(cfg))
    record_environment(RunDir(run_dir).environment_log)  # a resume on another machine or library says so
    return run_dir


def load_data(cfg: RunConfig, *, warn: bool = True) -> tuple[list[Any], list[Any]]:
    """(training examples, dev examples), every row of every file parsed and checked; `warn`:
    log the dev rows that are training rows too."""
    columns = cfg.data.columns()
    train = load_mixture(cfg.data.train, data_dir=cfg.data.data_dir, limit=cfg.data.train_limit, mapping=columns)
    dev = load_examples(cfg.data.dev, data_dir=cfg.data.data_dir, mapping=columns) if cfg.data.dev else []
    check_prompt_format(train, cfg.data.prompt_format, f"data.train ({cfg.data.train})")
    check_prompt_format(dev, cfg.data.prompt_format, f"data.dev ({cfg.data.dev})")
    if warn:  # only the dev rows the run scores: the first dev_limit (dev loss) / num_examples (ROUGE-L)
        scored = len(dev) if cfg.data.dev_limit is None else max(cfg.data.dev_limit, cfg.dev_eval.num_examples)
        what = f"data.dev ({cfg.data.dev}" + (
            f", the first {scored} rows, which the run scores)" if scored < len(dev) else ")"
        )
        consequence = "the dev scores that pick checkpoints count rows the student trained on"
        warn_shared_rows(what, dev[:scored], train, consequence)
    return with_instruction_suffix(train, cfg.data.instruction_suffix), with_instruction_suffix(
        dev, cfg.data.instruction_suffix
    )


def check_inputs(
    cfg: RunConfig, *, need_teacher: bool | None = None, data: tuple[list[Any], list[Any]] | None = None
) -> tuple[list[Any], list[Any]]:
    """Everything a run can check before reading any weights: the data (every row), then that
    each model it will load exists. Returns the data. With a 7B teacher a typo costs seconds,
    not the minutes of loading it first. `data`: what load_data(cfg) already gave (not read again)."""
    data = load_data(cfg) if data is None else data
    m = cfg.model
    if need_teacher is None:
        need_teacher = cfg.loss.alpha < 1.0
    check_model_spec(m.student)
    if need_teacher and m.teacher is not None:
        check_model_spec(m.teacher)
        if m.teacher_adapter and not Path(m.teacher_adapter).expanduser().exists():
            raise ConfigError(f"model.teacher_adapter: {m.teacher_adapter} does not exist (a PEFT adapter folder)")
    if need_teacher and cfg.loss.teacher_top_k:
        check_store_root(store_root(cfg.loss.teacher_store))
        student = Path(m.student).expanduser()
        if student.is_dir():  # a folder's tokenizer loads in a moment: checked before any run folder is made
            check_top_k(cfg, load_tokenizer(str(student), trust_remote_code=m.trust_remote_code))
    return data


def check_top_k(cfg: RunConfig, tokenizer: Any) -> None:
    """loss.teacher_top_k below the vocabulary: the store keeps k logits and a bucket for the rest."""
    if cfg.loss.teacher_top_k >= len(tokenizer):
        raise ConfigError(
            f"loss.teacher_top_k={cfg.loss.teacher_top_k} must be smaller than the vocabulary ({len(tokenizer)} "
            "tokens): the store keeps the k largest logits and one bucket for the rest (0: the dense teacher)"
        )


def load_models(
    cfg: RunConfig,
    *,
    need_teacher: bool | None = None,
    data: tuple[Sequence[Any], Sequence[Any]] | None = None,
    accelerator: Any = None,
    taus: Sequence[float] = (),
) -> tuple[Any, Any, Any]:
    """(student, teacher or None, tokenizer); tokenizers checked before any compute.

    The teacher is loaded when `need_teacher` (default: loss.alpha < 1, i.e. some KD term). With
    loss.teacher_top_k, `data` (training and dev examples), the `accelerator` and the run's
    temperatures `taus`: where the teacher store already holds every row at those temperatures
    for these teacher files, the teacher is a StoredTeacher and its weights are never read.
    """
    m = cfg.model
    tokenizer = load_tokenizer(m.student, trust_remote_code=m.trust_remote_code)
    teacher = None
    if need_teacher is None:
        need_teacher = cfg.loss.alpha < 1.0
    if need_teacher:
        check_top_k(cfg, tokenizer)  # before any weights are read (a Hub or GGUF student's tokenizer is known here)
    if need_teacher and m.teacher is None:
        raise ConfigError("this run has a KD term (alpha < 1) but model.teacher is null; name a teacher")
    if need_teacher:
        check_tokenizers(load_tokenizer(m.teacher, trust_remote_code=m.trust_remote_code), tokenizer)
    student = load_model(m.student, trust_remote_code=m.trust_remote_code)
    if need_teacher and data is not None and accelerator is not None:
        teacher = stored_teacher(cfg, tokenizer, student, data, accelerator, taus)
    if need_teacher and teacher is None:
        teacher = load_model(m.teacher, trust_remote_code=m.trust_remote_code)
        if m.teacher_adapter:
            teacher = merge_adapter(teacher, m.teacher_adapter)
    aligned_vocab_size(
        tokenizer, student, *([teacher] if teacher is not None and not isinstance(teacher, StoredTeacher) else [])
    )
    if cfg.lora.enabled:
        student = add_lora(student, cfg.lora, seed=cfg.seed)
    return student, teacher, tokenizer


def stored_teacher(
    cfg: RunConfig,
    tokenizer: Any,
    student: Any,
    data: tuple[Sequence[Any], Sequence[Any]],
    acc: Any,
    taus: Sequence[float],
) -> StoredTeacher | None:
    """The teacher store's entry for these teacher files, where it holds every training and dev
    row of the run at every temperature in `taus` (and the run needs the teacher for nothing
    else: no on-policy batches); None otherwise (the teacher is loaded)."""
    if not cfg.loss.teacher_top_k or cfg.on_policy.ratio or cfg.method == "gkd":
        return None
    dtype = inference_dtype_of(cfg.model.teacher_dtype, bf16_training=acc.mixed_precision == "bf16")
    source = teacher_source_key(cfg, dtype)
    store = find_source(store_root(cfg.loss.teacher_store), source) if source else None
    if store is None or store.meta.get("vocab") != len(tokenizer) or store.meta.get("top_k") != cfg.loss.teacher_top_k:
        return None
    enc, dev_enc = encode_stage_rows(cfg, tokenizer, *data, is_seq2seq(student))
    if store.missing([*enc, *dev_enc], [cfg.loss.tau, *taus]):
        return None
    log.info("teacher store %s holds every row of this run: the teacher's weights are not loaded", store.folder)
    if acc.is_main_process:
        store.note_use(cfg.model.teacher)
    return StoredTeacher(store)


def add_lora(model: Any, lora: Any, *, seed: int = 0) -> Any:
    """Wrap `model` with trainable LoRA adapters (everything else frozen), initialised from
    `seed` (so every process, and a resumed run, starts from the same adapter)."""
    import logging

    import torch
    from peft import LoraConfig, get_peft_model

    targets = lora.target_modules
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules="all-linear" if targets == ["all-linear"] else list(targets),
        task_type="CAUSAL_LM",
    )
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = get_peft_model(model, config)
    except ValueError as e:  # a target module that does not exist
        raise ConfigError(f"lora.target_modules={targets}: {e}") from e
    trainable, total = model.get_nb_trainable_parameters()
    logging.getLogger(__name__).info(
        "LoRA r=%d on %s: %d trainable parameters of %d (%.2f%%)",
        lora.r,
        targets,
        trainable,
        total,
        100 * trainable / total,
    )
    return model


def merge_adapter(model: Any, adapter: str) -> Any:
    """Load a PEFT adapter onto `model` and merge it into the weights (a plain model again)."""
    from pathlib import Path

    from peft import PeftModel

    if not (Path(adapter) / "adapter_config.json").exists():
        raise ConfigError(f"model.teacher_adapter={adapter!r} is not a PEFT adapter folder (no adapter_config.json)")
    return PeftModel.from_pretrained(model, adapter).merge_and_unload()


@folder_locks()  # the run folder is this process's until it returns
def run_train(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    train, dev = check_inputs(cfg)  # data and model paths first: no weights read before they pass
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    run_dir = prepare_run_dir(cfg) if acc.is_main_process else cfg.run_dir
    acc.wait_for_everyone()
    student, teacher, tokenizer = load_models(cfg, data=(train, dev), accelerator=acc)
    acc.print(
        f"srd train: {len(train)} training examples from {cfg.data.train}; "
        f"{len(dev)} dev examples (dev loss on the first {min(cfg.data.dev_limit or len(dev), len(dev))}, "
        f"dev ROUGE-L on the first {min(cfg.dev_eval.num_examples, len(dev))}); run directory {run_dir}"
    )
    summary = train_stage(
        cfg,
        student=student,
        teacher=teacher,
        tokenizer=tokenizer,
        train_examples=train,
        dev_examples=dev,
        out_dir=run_dir,
        accelerator=acc,
        progress=progress,
    )
    if acc.is_main_process:
        _print_summary(run_dir, summary, acc)
    return summary


def _print_summary(run_dir: Path, summary: dict[str, Any], acc: Any) -> None:
    first, last = summary.get("first_eval") or {}, summary.get("last_eval") or {}
    state = "finished" if summary["complete"] else f"paused at step {summary['steps']} (rerun to resume)"
    acc.print(f"srd train {state}: {summary['steps']}/{summary['total_steps']} steps, {summary['wall_time_s']:.0f} s")
    if "dev_rougeL" in first and "dev_rougeL" in last:
        acc.print(
            f"dev ROUGE-L: {first['dev_rougeL']:.2f} at step {first['step']} -> "
            f"{last['dev_rougeL']:.2f} at step {last['step']}"
        )
    stage = RunDir(run_dir).as_stage
    if summary["complete"]:
        acc.print(f"final model: {stage.final}; best (by dev metric): {stage.best}")
    acc.print(f"logs: {stage.logs} (JSONL), {stage.tensorboard} (TensorBoard)")
