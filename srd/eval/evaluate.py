"""`srd eval`: generate on benchmarks, score, and save per-example and summary results.

Layout under the output folder (a run's `eval/` by default):
    <benchmark>/seed-<S>.jsonl | greedy.jsonl   one row per example: id, prediction, score
    summary.json, summary.md                    mean per seed, mean and std over seeds, wall time

Finished (benchmark, seed) files are reused when the command is rerun, so an interrupted
evaluation continues; within a greedy benchmark, every answer is kept in
`<benchmark>/greedy.rank<R>.partial` as it finishes and only the missing ones are generated
on the rerun. Prompts are sharded over accelerate processes and gathered.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from srd.data.prompts import encode_prompt
from srd.data.sources import load_examples
from srd.eval.benchmarks import Benchmark, aggregate, describe, prepare_example, resolve_benchmark, score_examples
from srd.eval.generate import generate_responses, iter_responses
from srd.utils import atomic_write_json, atomic_write_text

PAPER_SEEDS = (10, 20, 30, 40, 50)


def resolve_eval_target(target: str) -> tuple[str, Path | None]:
    """(model spec, run directory or None). A run directory evaluates its final model."""
    path = Path(target)
    if (path / "results.json").exists():
        # relative to the run directory, so it works from any working directory
        last_stage = json.loads((path / "results.json").read_text())["stages"][-1]["stage"]
        return str(path / "stages" / last_stage / "final"), path
    if (path / "done.json").exists() and (path / "final").exists():
        return str(path / "final"), path
    return target, None


def partial_path(rows_path: Path, rank: int) -> Path:
    """Where process `rank` appends finished greedy batches of `rows_path` (not *.jsonl, so
    score readers never mistake it for a finished file)."""
    return rows_path.with_name(f"{rows_path.stem}.rank{rank}.partial")


def _read_partial(path: Path) -> dict[int, tuple[str, float]]:
    """Finished rows of an interrupted run: position -> (prediction, seconds); a torn last line is ignored."""
    done: dict[int, tuple[str, float]] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[int(row["i"])] = (row["prediction"], float(row["s"]))
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
    partial: Path | None = None,
    backend: str = "loop",
) -> tuple[list[str], float]:
    """Predictions for every example (sharded over processes) and the wall time.

    Greedy runs with `partial` set append each answer to that process's partial file as it
    finishes and generate only the missing ones when rerun."""
    from accelerate.utils import gather_object
    from tqdm.auto import tqdm

    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(range(len(examples)))[rank::world]
    prompts = [encode_prompt(tokenizer, examples[i], fmt, max_prompt_len) for i in mine]
    t0 = time.perf_counter()
    gen = dict(
        max_new_tokens=max_new_tokens or bench.max_new_tokens,
        no_repeat_ngram_size=no_repeat_ngram_size,
        stop_strings=bench.stop_strings,
        backend=backend,
        static_cache_len=max_prompt_len + (max_new_tokens or bench.max_new_tokens),
    )
    desc = f"{bench.name} {'greedy' if seed is None else seed}"
    spent = 0.0
    if seed is None and partial is not None:
        own = partial_path(partial, rank)
        done = _read_partial(own)
        outs = [done[i][0] if i in done else "" for i in range(len(prompts))]
        spent = sum(secs for _, secs in done.values())
        todo = [i for i in range(len(prompts)) if i not in done]
        bar = tqdm(
            total=len(prompts),
            initial=len(prompts) - len(todo),
            desc=desc,
            unit="prompt",
            disable=not (progress and accelerator.is_main_process),
        )
        own.parent.mkdir(parents=True, exist_ok=True)
        last = time.perf_counter()
        with open(own, "a", encoding="utf-8") as f:
            for j, text in iter_responses(model, tokenizer, [prompts[i] for i in todo], batch_size=batch_size, **gen):
                now = time.perf_counter()
                outs[todo[j]] = text
                # each answer is kept as it finishes, with the time since the previous one
                f.write(json.dumps({"i": todo[j], "prediction": text, "s": now - last}) + "\n")
                f.flush()
                last = now
                bar.update(1)
        bar.close()
    else:
        outs = generate_responses(
            model,
            tokenizer,
            prompts,
            batch_size=batch_size,
            do_sample=seed is not None,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            seed=None if seed is None else seed + rank,
            progress=progress and accelerator.is_main_process,
            desc=desc,
            **gen,
        )
    pairs = gather_object(list(zip(mine, outs)))
    elapsed = max(gather_object([spent + time.perf_counter() - t0]))
    predictions = [""] * len(examples)
    for i, text in pairs:
        predictions[i] = text
    return predictions, elapsed


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
) -> dict[str, Any]:
    """Evaluate on every benchmark; `seeds=None` forces greedy decoding everywhere."""
    out_dir = Path(out_dir)
    model.to(accelerator.device)
    summary_path = out_dir / "summary.json"
    summary: dict[str, Any] = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    summary.setdefault("benchmarks", {})
    for spec in benchmarks:
        bench = resolve_benchmark(spec)
        examples = [prepare_example(bench, ex) for ex in load_examples(bench.data, data_dir=data_dir, limit=limit)]
        runs = list(seeds) if (seeds is not None and bench.sampling) else [None]
        entry = summary["benchmarks"].get(bench.name, {})
        if entry.get("n") != len(examples):
            entry = {}
        entry.update(
            describe(bench),
            # what this evaluation decoded with, not only the benchmark's defaults
            sampling=bool(bench.sampling and seeds is not None),
            max_new_tokens=max_new_tokens or bench.max_new_tokens,
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
        for key in entry["per_seed"]:  # finished and saved: the partial batches are not needed
            partial_path(out_dir / bench.name / f"{key}.jsonl", accelerator.process_index).unlink(missing_ok=True)
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


def load_example_scores(eval_dir: Path, bench: str) -> dict[str, float]:
    """Per-example score averaged over the seeds (or greedy) of one benchmark."""
    totals: dict[str, list[float]] = {}
    for path in sorted((eval_dir / bench).glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            totals.setdefault(row["id"], []).append(float(row["score"]))
    return {k: statistics.fmean(v) for k, v in totals.items()}
