"""Selective reflection: the student answers every training prompt, and each example is
scored, ranked, fused, filtered and assigned a curriculum stage (SRD paper Sec. 3.2).

Resumable and multi-process:
  * each process appends finished rows (student output + statistics) to its own
    `outputs.rank<R>.jsonl`, flushed every CHUNK finished answers; a rerun skips ids already in any of
    these files and shards only what is left, so an interrupted reflection continues
    without regenerating finished rows, with any number of processes;
  * `meta.json` holds fingerprints of the data, the student and the settings; a
    changed data set or student is an error, never a silent reuse of stale rows;
  * once every row exists, the main process fuses the scores and writes `manifest.jsonl`
    (one row per example: id, scores, ranks, fused score, position, kept, stage, output)
    and `summary.json`, atomically. (Multi-node runs need a shared run directory.)
  * scorers relative to the teacher (teacher_ce, ce_gap) add one teacher forward over the
    references, no generation, in the main process: `teacher_stats.jsonl`, keyed on the
    teacher's fingerprint, the data and the lengths (`teacher_meta.json`), recomputed when any
    of them changes. A forward rather than the teacher cache: the cached top-k log-probabilities
    miss the reference token wherever the teacher ranks it below k, and the cache is built after
    the selection it would serve.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from srd.config import RunConfig
from srd.data.example import Example
from srd.data.prompts import encode_prompt
from srd.data.tokenize import Encoded, collate, encode_example, pad_id
from srd.generation.decode import iter_responses, length_batches, row_seeds, work_blocks
from srd.generation.decoding import Decoding
from srd.models.features import model_fingerprint, target_features
from srd.models.load import cast_for_inference, inference_dtype_of, is_seq2seq, precision_entry
from srd.reflect.fusion import length_strata, ranks, reciprocal_rank_fusion, select_and_partition
from srd.reflect.scorers import check_scorers, get_scorer, needs_teacher
from srd.utils import atomic_write_json, atomic_write_text, drop_torn_tail, read_json, read_jsonl

log = logging.getLogger(__name__)

CHUNK = 64  # examples between flushes to disk


class ReflectionError(ValueError):
    """Stale or inconsistent reflection state; the message says how to fix it."""


@torch.no_grad()
def sequence_stats(
    model: Any, tokenizer: Any, encoded: Sequence[Encoded], *, batch_size: int, chunk_size: int = 1024
) -> list[dict[str, float]]:
    """Per example: mean cross-entropy and mean predictive entropy of the student over the
    target tokens (labels != -100, EOS included), and their count."""
    model.eval()
    device = next(model.parameters()).device
    out: list[dict[str, float]] = [{} for _ in encoded]
    # longest first, so each batch pads little
    for idx in length_batches([e.input_ids for e in encoded], batch_size):
        batch = collate([encoded[i] for i in idx], pad_id(tokenizer))
        batch = {k: v.to(device) for k, v in batch.items()}
        h, targets, mask, head = target_features(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
        rows = torch.arange(mask.shape[0], device=device)[:, None].expand_as(mask)[mask]
        nll = torch.zeros(mask.shape[0], dtype=torch.float64, device=device)
        ent = torch.zeros_like(nll)
        for c in range(0, h.shape[0], chunk_size):
            logp = torch.log_softmax(head(h[c : c + chunk_size]).float()[..., : len(tokenizer)], dim=-1)
            tok_nll = -logp.gather(-1, targets[c : c + chunk_size, None]).squeeze(-1)
            tok_ent = -(logp.exp() * logp).sum(-1)
            nll.index_add_(0, rows[c : c + chunk_size], tok_nll.double())
            ent.index_add_(0, rows[c : c + chunk_size], tok_ent.double())
        counts = mask.sum(1).clamp_min(1).double()
        for i, pos in enumerate(idx):
            out[pos] = {
                "ce": (nll[i] / counts[i]).item(),
                "entropy": (ent[i] / counts[i]).item(),
                "ref_tokens": int(mask[i].sum()),
            }
    return out


def data_fingerprint(examples: Sequence[Example]) -> str:
    h = hashlib.sha256()
    for ex in examples:
        h.update(json.dumps([ex.id, ex.instruction, ex.input, ex.output]).encode())
    return h.hexdigest()[:16]


def _settings(cfg: RunConfig, scorers: Sequence[str], dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    g = cfg.generation
    return {
        **precision_entry("dtype", dtype),  # the decoding precision (generation.dtype)
        "scorers_need_generation": any(get_scorer(s).needs_generation for s in scorers),
        "ce_target": cfg.reflect.ce_target,
        "prompt_format": cfg.data.prompt_format,
        "max_prompt_len": cfg.data.max_prompt_len,
        "max_len": cfg.data.max_len,
        "generation": {
            k: getattr(g, k)
            for k in (
                "max_new_tokens",
                "do_sample",
                "temperature",
                "top_k",
                "top_p",
                "no_repeat_ngram_size",
                "stop_strings",
            )
        },
        "seed": cfg.seed,
    }


def _read_rows(folder: Path) -> dict[str, dict[str, Any]]:
    """Finished rows from every process's file; a torn last line (crash mid-write) is ignored."""
    rows: dict[str, dict[str, Any]] = {}
    for path in sorted(folder.glob("outputs.rank*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            rows[row["id"]] = row
    return rows


def _check_meta(folder: Path, meta: dict[str, Any]) -> None:
    path = folder / "meta.json"
    if not path.exists():
        return
    old = read_json(path)
    changed = [k for k in meta if old.get(k) != meta[k]]
    if changed:
        raise ReflectionError(
            f"{folder} holds reflection results for a different {', '.join(changed)}; they cannot be reused. "
            f"Delete {folder} to reflect again, or use another run name."
        )


def _reflect_rows(
    cfg: RunConfig,
    student: Any,
    tokenizer: Any,
    todo: Sequence[Example],
    out_file: Path,
    *,
    generate: bool,
    progress: bool,
    seeds: Sequence[int] | None = None,
    written: set[str] | frozenset[str] = frozenset(),
) -> float:
    """Generate + measure `todo`, appending rows to `out_file` every CHUNK finished examples;
    the seconds spent measuring and saving (the rest of the call is generation).

    Generation streams over all of `todo` (continuous batching keeps the batch full); answers
    are measured and saved in groups as they finish, so an interruption loses at most one group.
    Rows in `written` (saved before an interruption) are generated and measured with the rest,
    so that every group is batched as in one go, but not saved again."""
    g, r = cfg.generation, cfg.reflect
    fmt, mp, ml = cfg.data.prompt_format, cfg.data.max_prompt_len, cfg.data.max_len
    s2s = is_seq2seq(student)
    left = sum(ex.id not in written for ex in todo)
    bar = tqdm(total=left, desc="reflection", unit="ex", disable=not progress, dynamic_ncols=True)

    measured = [0.0]

    def save(group: list[tuple[Example, str]]) -> None:
        t0 = time.perf_counter()
        chunk = [ex for ex, _ in group]
        enc = [encode_example(tokenizer, ex, fmt=fmt, max_prompt_len=mp, max_len=ml, seq2seq=s2s) for ex in chunk]
        stats = sequence_stats(student, tokenizer, enc, batch_size=r.batch_size)
        if r.ce_target == "student_output":
            own = [Example(id=ex.id, instruction=ex.instruction, input=ex.input, output=o) for ex, o in group]
            own_enc = [encode_example(tokenizer, ex, fmt=fmt, max_prompt_len=mp, max_len=ml, seq2seq=s2s) for ex in own]
            for s, o in zip(stats, sequence_stats(student, tokenizer, own_enc, batch_size=r.batch_size)):
                s["ce_reference"], s["ce"] = s["ce"], o["ce"]
        lines = [
            json.dumps({"id": ex.id, "student_output": o, "stats": s}) + "\n"
            for (ex, o), s in zip(group, stats)
            if ex.id not in written
        ]
        with open(out_file, "a", encoding="utf-8") as f:
            f.write("".join(lines))
            f.flush()
        bar.update(len(lines))
        measured[0] += time.perf_counter() - t0

    group_size = max(CHUNK, g.batch_size)
    if not generate:
        for start in range(0, len(todo), group_size):
            save([(ex, "") for ex in todo[start : start + group_size]])
        bar.close()
        return measured[0]
    group: list[tuple[Example, str]] = []
    answers = iter_responses(
        student,
        tokenizer,
        [encode_prompt(tokenizer, ex, fmt, mp) for ex in todo],
        Decoding.of(g, static_cache_len=mp + g.max_new_tokens),
        seeds=seeds,
        seed=cfg.seed if g.do_sample else None,
    )
    for i, text in answers:
        group.append((todo[i], text))
        if len(group) >= group_size:
            save(group)
            group = []
    if group:
        save(group)
    bar.close()
    return measured[0]


def teacher_stats(
    cfg: RunConfig, teacher: Any, tokenizer: Any, examples: Sequence[Example], out_dir: Path, dtype: torch.dtype
) -> dict[str, dict[str, float]]:
    """Example id -> {"teacher_ce": the teacher's mean CE on the reference}, from
    `out_dir/teacher_stats.jsonl` when it was computed for this teacher, data and lengths, else
    measured now (one forward per row) and saved atomically."""
    fmt, mp, ml = cfg.data.prompt_format, cfg.data.max_prompt_len, cfg.data.max_len
    meta = {
        "teacher": model_fingerprint(teacher),
        "data": data_fingerprint(examples),
        **precision_entry("dtype", dtype),
        "prompt_format": fmt,
        "max_prompt_len": mp,
        "max_len": ml,
    }
    meta_path, rows_path = out_dir / "teacher_meta.json", out_dir / "teacher_stats.jsonl"
    if meta_path.exists() and rows_path.exists() and read_json(meta_path) == meta:
        return {r["id"]: {"teacher_ce": r["teacher_ce"]} for r in read_jsonl(rows_path)}
    s2s = is_seq2seq(teacher)
    enc = [encode_example(tokenizer, ex, fmt=fmt, max_prompt_len=mp, max_len=ml, seq2seq=s2s) for ex in examples]
    device = next(teacher.parameters()).device
    with cast_for_inference(teacher, dtype) as model:
        stats = sequence_stats(model.to(device), tokenizer, enc, batch_size=cfg.reflect.batch_size)
    rows = [{"id": ex.id, "teacher_ce": st["ce"]} for ex, st in zip(examples, stats)]
    atomic_write_text(rows_path, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write_json(meta_path, meta)
    return {r["id"]: {"teacher_ce": r["teacher_ce"]} for r in rows}


def _row_seeds_of(seed: int, examples: Sequence[Example], rows: Sequence[Example]) -> list[int]:
    """The sampling seed of each of `rows`: `row_seeds(seed, n)` by position in the whole
    training set, so a row keeps its seed in any process or rerun."""
    seed_of = dict(zip((ex.id for ex in examples), row_seeds(seed, len(examples))))
    return [seed_of[ex.id] for ex in rows]


def time_split(summary: dict[str, Any]) -> str:
    """' (generation X s, CE and statistics pass Y s)' for a reflection summary.json; empty for
    summaries written before the split was recorded."""
    if "measure_s" not in summary:
        return ""
    m = summary["measure_s"]
    return f" (generation {summary['wall_time_s'] - m:.0f} s, CE and statistics pass {m:.0f} s)"


def build_manifest(
    examples: Sequence[Example],
    rows: dict[str, dict[str, Any]],
    scorers: Sequence[str],
    *,
    rrf_k: float,
    keep_ratio: float,
    n_stages: int,
    order: str,
    seed: int,
    drop_invalid_references: bool = True,
    strata: int | None = None,
    stratify_stages: bool = False,
) -> list[dict[str, Any]]:
    """Score, rank, fuse, select and partition. One manifest row per example, input order.

    Rows whose reference fails a scorer's own check get `reference_ok: false`; with
    `drop_invalid_references` they are ranked (for the record) but never kept, and lambda
    applies to the valid rows. `strata`: keep the easiest lambda of each of that many
    equal-count groups of reference length (stats["ref_tokens"]), not of all rows; with
    `stratify_stages`, split each group into the stages on its own too."""
    ids = [ex.id for ex in examples]
    scores = {
        s: [get_scorer(s).fn(ex, rows[ex.id]["student_output"], rows[ex.id]["stats"]) for ex in examples]
        for s in scorers
    }
    checks = [get_scorer(s).reference_ok for s in scorers if get_scorer(s).reference_ok is not None]
    ref_ok = [all(check(ex) for check in checks) for ex in examples]
    by_scorer = {
        s: ranks(scores[s], ids, higher_is_easier=get_scorer(s).higher_is_easier, ties=get_scorer(s).ties)
        for s in scorers
    }
    fused = reciprocal_rank_fusion([by_scorer[s] for s in scorers], k=rrf_k)
    valid = [i for i in range(len(ids)) if ref_ok[i] or not drop_invalid_references]
    valid_ids = [ids[i] for i in valid]
    groups = length_strata([rows[i]["stats"]["ref_tokens"] for i in valid_ids], valid_ids, strata) if strata else None
    sub_ranking, sub_stage = select_and_partition(
        fused[valid],
        valid_ids,
        keep_ratio=keep_ratio,
        n_stages=n_stages,
        order=order,
        seed=seed,
        strata=groups,
        stratify_stages=stratify_stages,
    )
    stage: list[int | None] = [None] * len(ids)
    for j, i in enumerate(valid):
        stage[i] = sub_stage[j]
    stratum_of = {i: groups[j] for j, i in enumerate(valid)} if groups else {}
    invalid = sorted(set(range(len(ids))) - set(valid), key=lambda i: (-float(fused[i]), ids[i]))
    ranking = [valid[j] for j in sub_ranking] + invalid  # valid rows easy -> hard, then the dropped invalid ones
    position = np.empty(len(ids), dtype=np.int64)
    position[ranking] = np.arange(1, len(ids) + 1)
    return [
        {
            "id": ex.id,
            "scores": {s: scores[s][i] for s in scorers},
            # average ranks of tied groups can be halves (x.5)
            "ranks": {s: int(r) if float(r).is_integer() else float(r) for s in scorers for r in [by_scorer[s][i]]},
            "fused": float(fused[i]),
            "position": int(position[i]),
            "kept": stage[i] is not None,
            "stage": stage[i],
            "reference_ok": ref_ok[i],
            **({"stratum": stratum_of.get(i)} if groups else {}),
            "student_output": rows[ex.id]["student_output"],
            "stats": rows[ex.id]["stats"],
        }
        for i, ex in enumerate(examples)
    ]


def summarize(manifest: Sequence[dict[str, Any]], scorers: Sequence[str]) -> dict[str, Any]:
    """Distributions of each score, rank correlation between scorers, stage sizes."""
    from scipy.stats import spearmanr

    out: dict[str, Any] = {"examples": len(manifest), "kept": sum(r["kept"] for r in manifest)}
    bad = [r["id"] for r in manifest if not r.get("reference_ok", True)]
    out["invalid_references"] = {"count": len(bad), "ids": bad[:50]}
    for s in scorers:
        v = np.array([r["scores"][s] for r in manifest], dtype=np.float64)
        out[s] = {
            "min": float(np.nanmin(v)),
            "median": float(np.nanmedian(v)),
            "mean": float(np.nanmean(v)),
            "max": float(np.nanmax(v)),
        }
    if len(scorers) >= 2 and len(manifest) > 2:
        a = [r["ranks"][scorers[0]] for r in manifest]
        b = [r["ranks"][scorers[1]] for r in manifest]
        out["spearman_rank_correlation"] = {f"{scorers[0]}~{scorers[1]}": float(spearmanr(a, b).statistic)}
    stages = sorted({r["stage"] for r in manifest if r["stage"] is not None})
    out["stage_sizes"] = {str(s): sum(r["stage"] == s for r in manifest) for s in stages}
    return out


def reflect(
    cfg: RunConfig,
    *,
    student: Any,
    tokenizer: Any,
    examples: Sequence[Example],
    out_dir: Path,
    accelerator: Any,
    scorers: Sequence[str] | None = None,
    keep_ratio: float | None = None,
    progress: bool = True,
    teacher: Any = None,
) -> list[dict[str, Any]]:
    """Run (or resume) reflection into `out_dir` and return the manifest rows. `teacher` is
    needed only by scorers relative to the teacher (`needs_teacher`)."""
    from accelerate.utils import gather_object

    acc, out_dir = accelerator, Path(out_dir)
    scorers = list(scorers or cfg.reflect.scorers)
    check_scorers(scorers, allow_code_execution=cfg.allow_code_execution)
    if needs_teacher(scorers) and teacher is None:
        raise ReflectionError(
            f"reflect.scorers {scorers} measure the teacher's cross-entropy, but no teacher was given: "
            "set model.teacher"
        )
    keep_ratio = cfg.reflect.keep_ratio if keep_ratio is None else keep_ratio
    manifest_path = out_dir / "manifest.jsonl"
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise ReflectionError("training example ids must be unique for reflection")
    dtype = inference_dtype_of(cfg.generation.dtype, bf16_training=acc.mixed_precision == "bf16")
    meta = {
        "data": data_fingerprint(examples),
        "student": model_fingerprint(student),
        "settings": _settings(cfg, scorers, dtype),
    }
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        _check_meta(out_dir, meta)
        atomic_write_json(out_dir / "meta.json", meta)
    acc.wait_for_everyone()
    _check_meta(out_dir, meta)
    t0 = time.perf_counter()
    done = _read_rows(out_dir)
    # blocks of rows, each a stream of its own, generated again whole if cut short: a resumed
    # reflection batches every answer as one in one go does (bf16 answers depend on the batch)
    blocks = [
        [examples[i] for i in block]
        for block in work_blocks(len(examples), acc.process_index, acc.num_processes)
        if any(examples[i].id not in done for i in block)
    ]
    measure_s = 0.0
    if blocks:
        own_file = out_dir / f"outputs.rank{acc.process_index}.jsonl"
        drop_torn_tail(own_file)
        written = set(done)  # saved before an interruption: generated again with their block, not saved
        with cast_for_inference(student.to(acc.device), dtype) as model:  # the student trains on in float32
            for block in blocks:
                measure_s += _reflect_rows(
                    cfg,
                    model,
                    tokenizer,
                    block,
                    own_file,
                    generate=meta["settings"]["scorers_need_generation"],
                    progress=progress and acc.is_main_process,
                    # sampled answers: one seed per training row, the same in any process or rerun
                    seeds=_row_seeds_of(cfg.seed, examples, block) if cfg.generation.do_sample else None,
                    written=written,
                )
    own = time.perf_counter() - t0
    times = gather_object([(own, measure_s)])  # (wall, measuring) per process
    elapsed = max(w for w, _ in times)
    measured = max(m for _, m in times)
    acc.wait_for_everyone()
    if acc.is_main_process:
        rows = _read_rows(out_dir)
        missing = [i for i in ids if i not in rows]
        if missing:
            raise ReflectionError(f"reflection rows missing for {len(missing)} examples (e.g. {missing[:3]})")
        if needs_teacher(scorers):
            t1 = time.perf_counter()
            extra = teacher_stats(cfg, teacher, tokenizer, examples, out_dir, dtype)
            rows = {i: {**r, "stats": {**r["stats"], **extra[i]}} for i, r in rows.items()}
            elapsed += time.perf_counter() - t1
            measured += time.perf_counter() - t1
        c = cfg.curriculum
        manifest = build_manifest(
            examples,
            rows,
            scorers,
            rrf_k=cfg.reflect.rrf_k,
            keep_ratio=keep_ratio,
            n_stages=c.num_stages,
            order=c.order,
            seed=cfg.seed,
            drop_invalid_references=cfg.reflect.drop_invalid_references,
            strata=cfg.reflect.strata if cfg.reflect.stratify != "none" else None,
            stratify_stages=cfg.reflect.stratify == "reference_length_stages",
        )
        n_bad = sum(not r["reference_ok"] for r in manifest)
        if n_bad:
            log.warning(
                "%d of %d training rows have a reference that fails its own check (%s); %s",
                n_bad,
                len(manifest),
                ", ".join(r["id"] for r in manifest if not r["reference_ok"])[:200],
                "dropped" if cfg.reflect.drop_invalid_references else "kept (reflect.drop_invalid_references=false)",
            )
        atomic_write_text(manifest_path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in manifest))
        prev = read_json(out_dir / "summary.json") if (out_dir / "summary.json").exists() else {}
        summary = {
            **summarize(manifest, scorers),
            "scorers": scorers,
            "keep_ratio": keep_ratio,
            "wall_time_s": round(prev.get("wall_time_s", 0.0) + elapsed, 3),
            "processes": acc.num_processes,
        }
        if not prev or "measure_s" in prev:  # a summary from before the split: its part is unknown
            # of the wall time: the CE / statistics pass and saving (slowest process); the rest
            # is generation, model setup excluded
            summary["measure_s"] = round(prev.get("measure_s", 0.0) + measured, 3)
        atomic_write_json(out_dir / "summary.json", summary)
    acc.wait_for_everyone()
    return read_jsonl(manifest_path)
