"""`srd eval`: generate on benchmarks, score, and save per-example and summary results.

Layout under the output folder (a run's `eval/` by default):
    <benchmark>/seed-<S>.jsonl | greedy.jsonl   one row per example: id, prediction, score
    summary.json, summary.md                    mean per seed, mean and std over seeds, wall time

Finished (benchmark, seed) files are reused when the command is rerun, so an interrupted
evaluation continues; within a (benchmark, seed), every answer is kept in
`<benchmark>/<greedy|seed-S>.rank<R>.partial` as it finishes, and the rerun generates again
only the blocks of rows (`work_blocks`: up to 1,024) that miss answers, whole, so that it gives
the answers of an uninterrupted run in bf16 too. Blocks are shared over accelerate processes
and gathered. Sampled answers are seeded per example (`row_seeds`), so the same seed gives the
same answers in one go or resumed, and (in float32) in one process or eight.
"""

from __future__ import annotations

import hashlib
import json
import re
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srd.config import RunConfig, is_run_folder, load_config
from srd.data.example import warn_shared_rows
from srd.data.prompts import check_prompt_format, encode_prompt
from srd.data.sources import load_examples
from srd.eval.benchmarks import Benchmark, aggregate, describe, prepare_example, resolve_benchmark, score_examples
from srd.generation.decode import iter_responses, row_seeds, work_blocks
from srd.generation.decoding import Decoding
from srd.metrics.sandbox import CodeExecutionRefused, require_code_execution
from srd.models.features import model_fingerprint
from srd.models.load import ModelError, dtype_from_name, dtype_name, load_model, load_tokenizer
from srd.rundir import RunDir
from srd.utils import (
    MARKER,
    atomic_write_json,
    atomic_write_text,
    claim_folder,
    drop_torn_tail,
    folder_locks,
    lock_folder,
    read_json,
)


def resolve_eval_target(target: str) -> tuple[str, Path | None]:
    """(model spec, run directory or None). A run directory evaluates the model its run
    evaluates: the last stage's final weights, or with eval.checkpoint=best in its config.yaml
    the checkpoint with the best dev ROUGE-L (results.json's best_checkpoint)."""
    run = RunDir(Path(target))
    if run.results.exists():
        # relative to the run directory, so it works from any working directory
        results = read_json(run.results)
        best = results.get("best_checkpoint")
        if best and _run_checkpoint_setting(run) == "best":
            return str(run.stage(best["stage"]).best), run.path
        return str(run.stage(results["stages"][-1]["stage"]).final), run.path
    stage = run.as_stage  # an `srd train` run
    if stage.done.exists() and stage.final.exists():
        return str(stage.final), run.path
    if is_run_folder(run.path):  # not a model folder: say what it is, not "no config.json"
        saved = [
            str(p)
            for p in (*sorted(run.stages.glob("*/best")), *sorted(run.stages.glob("*/final")), stage.best)
            if (p / "config.json").is_file()
        ]
        raise ModelError(
            f"{target} is an srd run that has not finished (no {run.results.name} yet): rerun its command to "
            "finish it"
            + (f", or evaluate a model it saved ({', '.join(saved)})" if saved else "; it has saved no model yet")
        )
    return target, None


def check_run_eval_folder(out: Path, run_dir: Path | None, model_spec: str) -> None:
    """A run's own evaluation folder (RUN/eval/<mode>) holds that run's scores: `srd compare` and
    `srd report` read them as the run's. Only the run's own model (`srd eval RUN`) goes there,
    not another model, nor another checkpoint of the same run."""
    out = Path(out)
    owner = out.parent.parent
    if out.parent.name != "eval" or not is_run_folder(owner):
        return
    if run_dir is not None and Path(run_dir).resolve() == owner.resolve():
        return
    raise EvalError(
        f"{out} is where run {owner} keeps its own scores (srd compare and srd report read them as that run's): "
        f"evaluate {model_spec} into another folder, or evaluate the run itself (srd eval {owner})"
    )


def _run_checkpoint_setting(run: RunDir) -> str:
    """The run's eval.checkpoint, read with the run's own config."""

    return load_config(run.config).eval.checkpoint if run.config.exists() else "final"


def partial_path(rows_path: Path, rank: int) -> Path:
    """Where process `rank` appends the finished answers of `rows_path` (not *.jsonl, so
    score readers never mistake it for a finished file)."""
    return rows_path.with_name(f"{rows_path.stem}.rank{rank}.partial")


def _partials(rows_path: Path) -> list[Path]:
    return sorted(rows_path.parent.glob(f"{rows_path.stem}.rank*.partial"))


def _read_partials(rows_path: Path) -> dict[int, tuple[str, float]]:
    """Finished answers of an interrupted run, from every process's file: example row ->
    (prediction, seconds). A torn last line, and lines of older versions (which numbered rows
    per process), are ignored: those answers are generated again."""
    done: dict[int, tuple[str, float]] = {}
    for path in _partials(rows_path):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[int(row["row"])] = (row["prediction"], float(row["s"]))
            except (ValueError, KeyError, TypeError):
                continue
    return done


def _run_one(
    model: Any,
    tokenizer: Any,
    bench: Benchmark,
    examples: Sequence[Any],
    seed: int | None,
    *,
    fmt: str,
    max_prompt_len: int,
    batch_size: int,
    max_new_tokens: int | None,
    no_repeat_ngram_size: int,
    accelerator: Any,
    progress: bool,
    partial: Path,
    backend: str = "loop",
) -> tuple[list[str], float]:
    """Predictions for every example (sharded over processes) and the wall time.

    Each answer is appended to the process's partial file (next to `partial`) as it finishes.
    The rows are generated in blocks (`work_blocks`); a rerun generates again each block that
    is missing answers, whole, and keeps the answers it already had, so a resumed evaluation
    gives the answers of one in one go, in bf16 too. A sampled run gives example i the seed
    `row_seeds(seed, n)[i]`, so (with the `loop` and `vllm` backends) its answer does not
    depend on the process it runs in either (in float32; in bf16 another process count cuts
    other blocks, and can change a few answers)."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    blocks = work_blocks(len(examples), rank, world)
    mine = [i for block in blocks for i in block]
    done = _read_partials(partial)
    every_seed = None if seed is None else row_seeds(seed, len(examples))
    outs = {i: done[i][0] for i in mine if i in done}
    spent = sum(done[i][1] for i in outs)
    t0 = time.perf_counter()
    bar = tqdm(
        total=len(mine),
        initial=len(outs),
        desc=f"{bench.name} {'greedy' if seed is None else seed}",
        unit="prompt",
        disable=not (progress and accelerator.is_main_process),
    )
    own = partial_path(partial, rank)
    own.parent.mkdir(parents=True, exist_ok=True)
    drop_torn_tail(own)  # the next answer starts a line of its own, not the end of a torn one
    last = time.perf_counter()
    decoding = Decoding(
        max_new_tokens=max_new_tokens or bench.max_new_tokens,
        batch_size=batch_size,
        do_sample=seed is not None,  # instruction following samples at temperature 1, top-k 0, top-p 1
        no_repeat_ngram_size=no_repeat_ngram_size,
        stop_strings=tuple(bench.stop_strings),
        backend=backend,
        static_cache_len=max_prompt_len + (max_new_tokens or bench.max_new_tokens),
    )
    with open(own, "a", encoding="utf-8") as f:
        for block in blocks:
            if all(i in outs for i in block):
                continue
            # a block cut short is generated whole again: its rows batched as in one go (bf16)
            prompts = [encode_prompt(tokenizer, examples[i], fmt, max_prompt_len) for i in block]
            seeds = None if every_seed is None else [every_seed[i] for i in block]
            for j, text in iter_responses(model, tokenizer, prompts, decoding, seed=seed, seeds=seeds):
                i = block[j]
                if i in outs:
                    continue  # kept from before the interruption
                now = time.perf_counter()
                outs[i] = text
                # each answer is kept as it finishes, with the time since the previous one
                f.write(json.dumps({"row": i, "prediction": text, "s": now - last}) + "\n")
                f.flush()
                last = now
                bar.update(1)
    bar.close()
    pairs = gather_object(list(outs.items()))
    elapsed = max(gather_object([spent + time.perf_counter() - t0]))
    predictions = [""] * len(examples)
    for i, text in pairs:
        predictions[i] = text
    return predictions, elapsed


class EvalError(ValueError):
    """An evaluation folder that cannot be resumed as asked; the message says how to go on."""


def model_key(spec: str) -> str:
    """What names an evaluated model in its evaluation folder: a checkpoint inside a run by its
    path from the run directory on (quickstart/stages/stage-3/final, .../stage-3/best), another
    local folder by its name, anything else (Hub id, bundled alias) as given; so a run directory
    moved to another parent folder still matches its own evaluations."""
    path = Path(spec)
    if not path.exists():
        return spec
    parts = path.resolve().parts
    if "stages" in parts[1:]:
        return "/".join(parts[len(parts) - 2 - parts[::-1].index("stages") :])
    return path.resolve().name


def default_eval_name(spec: str) -> str:
    """The folder name `srd eval` writes a model's results under (runs/eval/<name>-<mode>) when no
    --out is given: a run's checkpoint by its run, stage and kind (`a-stage-1-best`); another local
    folder by its name and a hash of its absolute path, so that two folders called `student` (or
    two runs' `final`) never share one; a Hub id or alias as given, `/` replaced."""
    key = model_key(spec)
    if "/stages/" in key:
        return key.replace("/stages/", "-").replace("/", "-")
    path = Path(spec)
    if path.exists():
        resolved = str(path.resolve())
        return f"{path.resolve().name}-{hashlib.sha256(resolved.encode()).hexdigest()[:8]}"
    return spec.replace("/", "-")


def claim_eval_folder(out_dir: Path, create: bool = True) -> None:
    """FolderError unless srd may write an evaluation into `out_dir`: a new or empty folder, one
    srd marked as an evaluation, or one an older srd evaluated into (its decoding.json,
    summary.json, or an interrupted benchmark's kept answers). A user's folder, or one srd made
    for something else (a run's own folder), is refused: summary.json, summary.md and a folder
    per benchmark would replace theirs. `create=False`: only check (before a model loads)."""
    claim_folder(
        out_dir,
        "evaluation",
        legacy=any((out_dir / name).is_file() for name in ("decoding.json", "summary.json"))
        or any(out_dir.glob("*/*.rank*.partial")),
        how=None,
        create=create,
        label="evaluation folder",
        choose="evaluate into a new or empty folder (srd eval --out)",
    )


def _check_folder(out_dir: Path, dtype: str, key: str | None, write: bool, fingerprint: str | None = None) -> None:
    """An evaluation folder's answers all come from one model (`key`, see model_key; None: not
    checked) with its weights in one precision, both recorded in decoding.json: resuming answers
    decoded in float32 with bf16 (or back), or a run's best/ after its final/ (eval.checkpoint),
    would mix two models' outputs in one score or reuse the other one's. Folders from before
    eval.dtype existed hold float32 answers; from before the model was recorded, they are taken to
    hold the model that resumes them. `fingerprint` (srd.models.features.model_fingerprint of
    the loaded weights) is recorded too: two models with the same name (two folders called
    `student`, a folder retrained in place) are told apart by their weights."""
    if out_dir.exists() and not out_dir.is_dir():
        raise EvalError(f"{out_dir} is a file, not a folder: evaluate into another folder (srd eval --out)")
    if write:  # the process that writes probes (another one's probe folders could vanish under it)
        claim_eval_folder(out_dir)
        lock_folder(out_dir, "evaluation folder")  # a second srd eval into it now would mix the two's answers
    path = out_dir / "decoding.json"
    record = read_json(path) if path.exists() else {}
    earlier = record.get("dtype")
    if earlier is None and out_dir.is_dir() and any(p.name not in ("decoding.json", MARKER) for p in out_dir.iterdir()):
        earlier = "float32"
    if earlier is not None and earlier != dtype:
        raise EvalError(
            f"{out_dir} holds answers decoded with {earlier} weights, and this evaluation decodes with {dtype}: "
            f"resume it with eval.dtype={earlier} (srd eval --dtype {earlier}), or evaluate into another "
            "folder (srd eval --out) or delete that one"
        )
    if key is not None and record.get("model", key) != key:
        raise EvalError(
            f"{out_dir} holds the evaluation of {record['model']}, and this one evaluates {key}: evaluate into "
            "another folder (srd eval --out), delete that one, or go back to the model it holds (in srd run, "
            "eval.checkpoint: final and best are different models)"
        )
    if fingerprint is not None and record.get("fingerprint", fingerprint) != fingerprint:
        raise EvalError(
            f"{out_dir} holds the evaluation of {record.get('model', 'a model')} with other weights (fingerprint "
            f"{record['fingerprint']}, this model's is {fingerprint}): evaluate into another folder (srd eval "
            "--out), or delete that one to evaluate this model there"
        )
    complete = {
        "dtype": earlier or dtype,
        **({} if key is None else {"model": key}),
        **({} if fingerprint is None else {"fingerprint": fingerprint}),
        **record,
    }
    if write and complete != record:
        out_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, complete)


def _rows_digest(examples: Sequence[Any]) -> str:
    """SHA-256 of the rows a benchmark's answers belong to: ids, prompts (conversations too) and
    references, in order."""
    h = hashlib.sha256()
    for ex in examples:
        row = [ex.id, ex.instruction, ex.input, ex.output, ex.meta.get("messages")]
        h.update(json.dumps(row, ensure_ascii=False).encode("utf-8") + b"\n")
    return h.hexdigest()


def _bench_examples(bench: Benchmark, data_dir: str | None, limit: int | None) -> list[Any]:
    """A benchmark's rows as they are prompted (task-specific content added)."""
    return [prepare_example(bench, ex) for ex in load_examples(bench.data, data_dir=data_dir, limit=limit)]


def _bench_settings(
    bench: Benchmark,
    examples: Sequence[Any],
    seeds: Sequence[int] | None,
    max_new_tokens: int | None,
    no_repeat_ngram_size: int,
    fmt: str,
    max_prompt_len: int,
) -> dict[str, Any]:
    """What a benchmark's answers depend on besides the model: the decoding and the rows."""
    return {
        "sampling": bool(bench.sampling and seeds is not None),
        "max_new_tokens": max_new_tokens or bench.max_new_tokens,
        "no_repeat_ngram_size": no_repeat_ngram_size,
        "prompt_format": fmt,
        "max_prompt_len": max_prompt_len,
        "n": len(examples),
        "rows": _rows_digest(examples),
    }


def check_decodings(
    out_dir: Path,
    benchmarks: Sequence[str],
    *,
    seeds: Sequence[int] | None,
    limit: int | None,
    data_dir: str | None,
    fmt: str,
    max_prompt_len: int,
    max_new_tokens: int | None,
    no_repeat_ngram_size: int,
) -> None:
    """evaluate()'s check of each benchmark's recorded settings, made before a model is loaded
    (reads only), so a refused rerun costs no loading time."""
    out_dir = Path(out_dir)
    claim_eval_folder(out_dir, create=False)
    if not out_dir.is_dir():
        return
    summary = read_json(out_dir / "summary.json") if (out_dir / "summary.json").exists() else {}
    for spec in benchmarks:
        bench = resolve_benchmark(spec)
        examples = _bench_examples(bench, data_dir, limit)
        settings = _bench_settings(bench, examples, seeds, max_new_tokens, no_repeat_ngram_size, fmt, max_prompt_len)
        _check_bench_settings(out_dir, bench.name, settings, False, summary.get("benchmarks", {}).get(bench.name, {}))


def _check_bench_settings(
    out_dir: Path, bench: str, settings: dict[str, Any], write: bool, entry: dict[str, Any] | None = None
) -> None:
    """A benchmark's answers in an evaluation folder all come from one decoding of one set of rows:
    its settings are recorded in decoding.json before the first answer is kept, and a rerun with
    other settings (another token budget, prompt format, greedy after sampled, another eval.limit,
    an edited benchmark file) is refused, naming what changed. Without this, a finished decoding
    or an interrupted one's kept answers would be reused and reported under the new settings.
    A benchmark evaluated before the record existed is checked against what its summary `entry`
    says (decoding, token budget, rows), then adopts the settings that resume it; one whose folder
    was deleted starts again with the new settings."""
    path = out_dir / "decoding.json"
    record = read_json(path) if path.exists() else {}
    fresh = not (out_dir / bench).exists()  # no answers, finished or kept (deleted to decode it again)
    earlier = None if fresh else record.get("benchmarks", {}).get(bench)
    if earlier is None and entry and entry.get("per_seed") and not fresh:
        earlier = {k: entry[k] for k in ("sampling", "max_new_tokens", "n") if k in entry}
        compared = {k: settings[k] for k in earlier}
    else:
        compared = settings
    if earlier is not None and earlier != compared:
        changed = [k for k in sorted(set(earlier) | set(compared)) if earlier.get(k) != compared.get(k)]
        if "n" in changed and "rows" in changed:
            changed.remove("rows")
        what = "; ".join(
            "the rows (the benchmark file changed)"
            if k == "rows"
            else f"{k} {earlier.get(k)!r}, now {compared.get(k)!r}"
            for k in changed
        )
        raise EvalError(
            f"{out_dir / bench} holds answers decoded with other settings ({what}): evaluate into another folder "
            f"(srd eval --out), go back to those settings, or delete {out_dir / bench} to decode it again"
        )
    if write and record.get("benchmarks", {}).get(bench) != settings:
        record.setdefault("benchmarks", {})[bench] = settings
        atomic_write_json(path, record)


def check_benchmarks(
    benchmarks: Sequence[str],
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    allow_code_execution: bool = False,
    fmt: str = "alpaca",
    train: Sequence[Any] = (),
) -> None:
    """Resolve every benchmark and parse its rows now, before a model is loaded to answer them;
    a benchmark scored by running code (mbpp) only when code execution is allowed; conversations
    only with the chat prompt format (`fmt`). `train`: the model's training rows, whose copies in
    a benchmark are logged (their scores measure rows it trained on)."""
    for spec in benchmarks:
        bench = resolve_benchmark(spec)
        if bench.metric == "pass_at_1":
            try:
                require_code_execution(allow_code_execution, f"benchmark {bench.name}")
            except CodeExecutionRefused as e:
                raise EvalError(str(e)) from None
        rows = load_examples(bench.data, data_dir=data_dir, limit=limit)
        check_prompt_format(rows, fmt, f"benchmark {spec}")
        if train:
            warn_shared_rows(f"benchmark {spec}", rows, train, "their scores measure rows the student trained on")


@folder_locks()  # the evaluation folder is this process's until it returns
def evaluate(
    model: Any,
    tokenizer: Any,
    benchmarks: Sequence[str],
    out_dir: Path,
    *,
    seeds: Sequence[int] | None,
    limit: int | None = None,
    data_dir: str | None = None,
    fmt: str = "alpaca",
    max_prompt_len: int = 256,
    batch_size: int = 16,
    max_new_tokens: int | None = None,
    no_repeat_ngram_size: int = 0,
    accelerator: Any,
    progress: bool = True,
    backend: str = "loop",
    model_name: str | None = None,
) -> dict[str, Any]:
    """Evaluate on every benchmark; `seeds=None` forces greedy decoding everywhere. `model_name`
    (its spec): recorded in the folder, and a folder holding another model's answers is refused."""
    out_dir = Path(out_dir)
    model.to(accelerator.device)
    key = None if model_name is None else model_key(model_name)
    fingerprint = model_fingerprint(model)
    _check_folder(out_dir, dtype_name(next(model.parameters()).dtype), key, accelerator.is_main_process, fingerprint)
    accelerator.wait_for_everyone()
    summary_path = out_dir / "summary.json"
    summary: dict[str, Any] = read_json(summary_path) if summary_path.exists() else {}
    summary.setdefault("benchmarks", {})
    for spec in benchmarks:
        bench = resolve_benchmark(spec)
        examples = _bench_examples(bench, data_dir, limit)
        runs = list(seeds) if (seeds is not None and bench.sampling) else [None]
        settings = _bench_settings(bench, examples, seeds, max_new_tokens, no_repeat_ngram_size, fmt, max_prompt_len)
        entry = summary["benchmarks"].get(bench.name, {})
        _check_bench_settings(out_dir, bench.name, settings, accelerator.is_main_process, entry)
        accelerator.wait_for_everyone()
        if entry.get("n") != len(examples) or not (out_dir / bench.name).exists():
            entry = {}  # never finished, or its answers deleted: no score of it is kept
        entry.update(
            describe(bench),
            # what this evaluation decoded with, not only the benchmark's defaults
            sampling=settings["sampling"],
            max_new_tokens=settings["max_new_tokens"],
            n=len(examples),
            per_seed=entry.get("per_seed", {}),
            wall_time_s=entry.get("wall_time_s", {}),
        )
        for seed in runs:
            key = "greedy" if seed is None else f"seed-{seed}"
            rows_path = out_dir / bench.name / f"{key}.jsonl"
            if rows_path.exists() and key in entry["per_seed"]:
                continue  # finished earlier
            preds, elapsed = _run_one(
                model,
                tokenizer,
                bench,
                examples,
                seed,
                fmt=fmt,
                max_prompt_len=max_prompt_len,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                no_repeat_ngram_size=no_repeat_ngram_size,
                backend=backend,
                accelerator=accelerator,
                progress=progress,
                partial=rows_path,
            )
            if accelerator.is_main_process:
                scores = score_examples(bench, examples, preds)
                atomic_write_text(
                    rows_path,
                    "".join(
                        json.dumps({"id": ex.id, "prediction": p, "score": s}) + "\n"
                        for ex, p, s in zip(examples, preds, scores)
                    ),
                )
                entry["per_seed"][key] = aggregate(bench, examples, preds, scores)
                entry["wall_time_s"][key] = round(elapsed, 3)
        values = list(entry["per_seed"].values())
        entry["mean"] = statistics.fmean(values) if values else float("nan")
        entry["std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        summary["benchmarks"][bench.name] = entry
        if accelerator.is_main_process:
            atomic_write_json(summary_path, summary)
            atomic_write_text(out_dir / "summary.md", summary_markdown(summary))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:  # finished and saved: the partial answers are not needed
            for key in entry["per_seed"]:
                for path in _partials(out_dir / bench.name / f"{key}.jsonl"):
                    path.unlink(missing_ok=True)
        accelerator.wait_for_everyone()
    return summary


def summary_markdown(summary: dict[str, Any]) -> str:
    lines = [
        "| benchmark | metric | n | decoding | score | std over seeds | wall time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, e in summary["benchmarks"].items():
        decoding = ", ".join(e["per_seed"]) or "-"
        wall = sum(e["wall_time_s"].values())
        lines.append(
            f"| {name} | {e['metric']} | {e['n']} | {decoding} | {e['mean']:.2f} | {e['std']:.2f} | {wall:.0f} |"
        )
    return "\n".join(lines) + "\n"


ANSWER_FILE = re.compile(r"(greedy|seed-\d+)\.jsonl")


def answer_files(eval_dir: Path, bench: str) -> list[Path]:
    """The per-example files of one benchmark that this evaluation wrote: those its summary.json
    lists (the decodings that finished; none for a benchmark it does not list), or, in a folder
    whose summary lists no decodings or that has none, every `greedy.jsonl` / `seed-<S>.jsonl`.
    Any other file there (a copy, another tool's output) is never read as an answer of this model."""
    eval_dir = Path(eval_dir)
    summary = eval_dir / "summary.json"
    entry = read_json(summary).get("benchmarks", {}).get(bench) if summary.exists() else {}
    if entry is None:  # not (yet) evaluated on this benchmark
        return []
    if "per_seed" not in entry:  # no summary, or one that does not list its decodings
        return sorted(p for p in (eval_dir / bench).glob("*.jsonl") if ANSWER_FILE.fullmatch(p.name))
    files = [eval_dir / bench / f"{key}.jsonl" for key in sorted(entry["per_seed"])]
    for path in files:
        if not path.exists():
            raise EvalError(
                f"{path} is missing, but {summary} lists it: rerun `srd eval` into {eval_dir} to decode it again"
            )
    return files


def load_example_scores(eval_dir: Path, bench: str) -> dict[str, float]:
    """Per-example score averaged over the seeds (or greedy) of one benchmark."""
    totals: dict[str, list[float]] = {}
    for path in answer_files(eval_dir, bench):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            totals.setdefault(row["id"], []).append(float(row["score"]))
    return {k: statistics.fmean(v) for k, v in totals.items()}


def evaluate_model(
    spec: str,
    cfg: RunConfig,
    out_dir: Path,
    *,
    accelerator: Any,
    progress: bool = True,
    benchmarks: Sequence[str] | None = None,
) -> dict[str, Any]:
    """Load the model `spec` names in eval.dtype and evaluate it into `out_dir` with a config's
    settings: the eval section (benchmarks unless `benchmarks` is given, seeds or greedy, rows,
    token budget, batch size), data.prompt_format / max_prompt_len / data_dir and
    generation.backend. What `srd eval` and `srd run`'s evaluations both do."""
    e, trust = cfg.eval, cfg.model.trust_remote_code
    benchmarks = e.benchmarks if benchmarks is None else benchmarks
    settings = dict(
        seeds=None if e.greedy else e.seeds,
        limit=e.limit,
        data_dir=cfg.data.data_dir,
        fmt=cfg.data.prompt_format,
        max_prompt_len=cfg.data.max_prompt_len,
        max_new_tokens=e.max_new_tokens,
        no_repeat_ngram_size=e.no_repeat_ngram_size,
    )
    check_decodings(out_dir, benchmarks, **settings)
    tokenizer = load_tokenizer(spec, trust_remote_code=trust)
    model = load_model(spec, dtype=dtype_from_name(e.dtype), trust_remote_code=trust).eval()
    return evaluate(
        model,
        tokenizer,
        benchmarks,
        out_dir,
        batch_size=e.batch_size,
        backend=cfg.generation.backend,
        accelerator=accelerator,
        progress=progress,
        model_name=spec,
        **settings,
    )
