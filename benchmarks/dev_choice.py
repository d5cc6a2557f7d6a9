"""Choose between rows of a quality table on dev data only, over training seeds.

A run's log keeps only its mean dev ROUGE-L, and on 200 dev rows two checkpoints less than about
0.5-0.7 apart are not ranked by it (benchmarks/dev_noise.py). This script decodes every finished
row's best checkpoint on the dev rows again, the way the run's dev evaluation did (its config: dev
set and rows, prompt template, generation settings and precision, greedy, the decode loop), keeps
each dev row's score, and tests each row against a reference row with both sources of variance:
per-row scores averaged over the training seeds both rows finished, paired (mean difference, 95%
bootstrap interval, Wilcoxon p), and the sign of the mean difference seed by seed.

    python benchmarks/dev_choice.py --out runs/quality-paper-cpu --preset paper-cpu \\
        --rows paper kd kdtau2 cegap strat --seeds 42 7 1

Rows: `kd` (the base run's KD baseline), `paper` (the base run's SRD, the preset's own settings)
and the preset's variant names. The first row is the reference. Rule printed with the table: a row
replaces the reference only if it is ahead with p < 0.05 and on every seed. Decoded scores are
kept in <out>/dev-rows/ (one file per model, keyed on its files' names, sizes and times), so a
rerun after another seed finishes decodes only the new models; runs that kept their own dev answers
(logs/dev-answers/, srd since 2026-12-06) are read, not decoded. `--sampled-seeds` scores each dev
row by its mean over sampled answers at T = 1 instead (a dev score closer to the paper's test
protocol; these are still the checkpoints the greedy dev score chose).

`--fresh N` scores the N dev rows after the ones the runs evaluated on instead (rows 200-999 of
dolly-dev for paper-cpu, with N = 800): no checkpoint was chosen on them, so a row's score there is
free of the upward bias of having been picked as the best of its dev curve, and four times as many
rows separate smaller differences. The record also gives each row's difference by the reference's
length, so that a change in answer length cannot hide in the mean.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.quality import PRESETS, overrides_for, run_names  # noqa: E402


def best_checkpoint(run: Path) -> tuple[Path, float] | None:
    """(best checkpoint folder, its logged dev ROUGE-L) of a finished run (or KD baseline) folder, or None."""
    results = run / "results.json"
    if not results.exists():
        return None
    r = json.loads(results.read_text())
    best = r.get("best_checkpoint") or {}
    if not r.get("complete") or not best.get("model"):
        return None
    # the path was written relative to the folder the run started in: take it from the run's name on
    model = Path(best["model"])
    parts = model.parts
    if run.name in parts:
        model = run.joinpath(*parts[parts.index(run.name) + 1 :])
    return model, float(best["dev_rougeL"])


def dev_rows(cfg: Any, fresh: int) -> list[Any]:
    """The dev examples scored: the run's own dev rows (the first dev_eval.num_examples of its dev
    set), or with `fresh` the `fresh` rows after them."""
    from srd.data.sources import load_examples

    n = cfg.dev_eval.num_examples
    if not fresh:
        dev = load_examples(cfg.data.dev, limit=cfg.data.dev_limit, data_dir=cfg.data.data_dir)
        return dev[: min(n, len(dev))]
    dev = load_examples(cfg.data.dev, limit=None, data_dir=cfg.data.data_dir)
    if len(dev) < n + fresh:
        raise SystemExit(
            f"--fresh {fresh}: the dev set {cfg.data.dev} has {len(dev)} rows, {n} of them the runs' own dev rows; "
            f"use --fresh {len(dev) - n} or less"
        )
    return dev[n : n + fresh]


def dev_scores(cfg: Any, model_dir: Path, sampled_seeds: list[int], dev: list[Any]) -> tuple[list[float], list[float]]:
    """Each dev row's ROUGE-L (x100) as the run's dev evaluation computes it, and its answer's
    words; with sampled seeds, each row's mean over one sampled answer per seed."""
    import torch

    from srd.data.prompts import encode_prompt
    from srd.eval.breakdown import words
    from srd.generation.decode import generate_responses, row_seeds
    from srd.generation.decoding import Decoding
    from srd.metrics.text import rouge_l
    from srd.models import load_model, load_tokenizer
    from srd.models.load import cast_for_inference, inference_dtype_of

    dtype = inference_dtype_of(cfg.generation.dtype, bf16_training=cfg.train.precision == "bf16")
    tokenizer = load_tokenizer(str(model_dir))
    model = load_model(str(model_dir), dtype=torch.float32).eval()
    prompts = [encode_prompt(tokenizer, ex, cfg.data.prompt_format, cfg.data.max_prompt_len) for ex in dev]
    sampling = {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0} if sampled_seeds else {}
    decoding = Decoding.of(
        cfg.generation, max_new_tokens=cfg.dev_eval.max_new_tokens, backend="loop", **{"do_sample": False, **sampling}
    )
    per_seed, lengths = [], []
    with cast_for_inference(model, dtype):
        for seed in sampled_seeds or [None]:
            seeds = None if seed is None else row_seeds(seed, len(dev))
            answers = generate_responses(model, tokenizer, prompts, decoding, seeds=seeds)
            per_seed.append([rouge_l(a, ex.references) for a, ex in zip(answers, dev)])
            lengths.append([words(a) for a in answers])
    return [statistics.fmean(col) for col in zip(*per_seed)], [statistics.fmean(col) for col in zip(*lengths)]


def cached_scores(
    cache: Path, cfg: Any, run: Path, model: Path, sampled_seeds: list[int], dev: list[Any], fresh: int
) -> tuple[list[float], list[float] | None, bool]:
    """(per-row dev scores, per-row answer words where known, whether they were decoded now): the
    dev answers the run (its folder, or its KD baseline's) kept for its best checkpoint where it
    has them in this setting (its own dev rows only), else from <cache> when the same
    model files, rows and setting were decoded before, else decoded."""
    from srd.eval.breakdown import words
    from srd.models.load import model_files_key
    from srd.report import best_dev_answers, mean_by_id
    from srd.utils import atomic_write_text

    logged = None if fresh else best_dev_answers(run, sampled_seeds)
    if logged is not None:
        scores = mean_by_id(logged, lambda r: float(r["score"]))
        lengths = mean_by_id(logged, lambda r: words(r["prediction"]))
        return list(scores.values()), list(lengths.values()), False
    if not list(model.glob("*.safetensors")):
        raise SystemExit(f"{model}: no *.safetensors weights (a finished run's best checkpoint has them)")
    key = {"weights": model_files_key(str(model)), "sampled_seeds": sampled_seeds, "dev": cfg.data.dev}
    if fresh:  # (keys of the runs' own rows stay as they were: caches written before still match)
        key["rows"] = [dev[0].id, dev[-1].id, len(dev)]
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept.get("key") == key:
            return kept["scores"], kept.get("words"), False
    scores, lengths = dev_scores(cfg, model, sampled_seeds, dev)
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cache, json.dumps({"model": str(model), "key": key, "scores": scores, "words": lengths}) + "\n")
    return scores, lengths, True


def pooled(per: dict[str, dict[int, dict[str, float]]], row: str, seeds: list[int]) -> dict[str, float]:
    """Dev row -> `row`'s score there, the mean over `seeds` (the per-row score a paired test over
    training seeds uses)."""
    first = per[row][seeds[0]]
    return {i: statistics.fmean(per[row][s][i] for s in seeds) for i in first}


def by_length(
    per: dict[str, dict[int, dict[str, float]]], rows: list[str], seeds: list[int], dev: list[Any]
) -> list[str]:
    """Markdown: each row minus the first by the reference's length (srd's reference-length
    buckets), per dev row the mean over the seeds both finished, paired."""
    from srd.eval.breakdown import groups
    from srd.report import paired_difference

    index = {ex.id: str(i) for i, ex in enumerate(dev)}
    buckets = {k: [index[i] for i in ids] for k, ids in groups(dev).items() if k.startswith("reference")}
    ref = rows[0]
    lines = [
        "",
        f"By the reference's length: each row minus `{ref}`, seeds pooled as above (mean difference, Wilcoxon p).",
        "",
        "| row | " + " | ".join(f"{k} (n = {len(v)})" for k, v in buckets.items()) + " |",
        "|---|" + "---|" * len(buckets),
    ]
    for row in rows[1:]:
        both = [s for s in seeds if s in per.get(row, {}) and s in per.get(ref, {})]
        if not both:
            continue
        a, b = pooled(per, ref, both), pooled(per, row, both)
        cells = []
        for ids in buckets.values():
            d = paired_difference({i: a[i] for i in ids}, {i: b[i] for i in ids})
            cells.append(f"{d['diff']:+.2f} (p = {d['p']:.2g})" if d["n"] else "-")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return lines


def check_variant_runs(out: Path, preset: dict[str, Any], args: argparse.Namespace) -> None:
    """Each variant row is labelled by its name: refuse (SystemExit) a run whose saved config is
    not what quality.py gives that variant now, with the overrides its seed's base run was given
    (a variant redefined since it ran would be reported under the new definition)."""
    import yaml

    from srd.config import load_config, to_dict
    from srd.recipes.train import RESUME_SAFE_KEYS as SAFE
    from srd.recipes.train import RESUME_SAFE_PREFIXES as SAFE_PREFIXES
    from srd.recipes.train import config_differences, flatten_config

    for row in args.rows:
        variant = "" if row in ("kd", "paper") else row
        for seed in args.seeds if variant else []:
            base_name = run_names(args.preset, [args.divergence], [seed])[0][0]
            name = run_names(args.preset, [args.divergence], [seed], [variant])[0][0]
            base, saved = out / base_name / "config.yaml", out / name / "config.yaml"
            if not (base.exists() and saved.exists()):
                continue
            # the command's own key=value overrides: where the base run differs from the preset
            given = flatten_config(yaml.safe_load(base.read_text(encoding="utf-8")) or {})
            default = flatten_config(
                to_dict(load_config(None, overrides_for(preset, args.divergence, seed, base_name, out, True, [])))
            )
            extra = [
                f"{k}={json.dumps(v)}"
                for k, v in given.items()
                if k in default and default[k] != v and k not in SAFE and not k.startswith(SAFE_PREFIXES)
            ]
            wanted = load_config(None, overrides_for(preset, args.divergence, seed, name, out, False, extra, variant))
            diffs = config_differences(saved, wanted)
            if diffs:
                raise SystemExit(
                    f"{out / name} is not row {row} as preset {args.preset} defines it now ({'; '.join(diffs[:4])}): "
                    "compare it with the code that ran it, or run the row again"
                )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="the quality runs' folder (quality.py --out)")
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--rows", nargs="+", required=True, help="kd, paper, or variant names; the first is the reference")
    p.add_argument("--seeds", type=int, nargs="+", required=True, help="training seeds")
    p.add_argument("--divergence", default="fkl")
    p.add_argument("--sampled-seeds", type=int, nargs="*", default=[], help="score dev rows sampled at T = 1")
    p.add_argument(
        "--fresh",
        type=int,
        default=0,
        metavar="N",
        help="score the N dev rows after the runs' own (rows no checkpoint was chosen on) instead of those",
    )
    p.add_argument("--record", default=None, help="markdown record path (default benchmarks/results/...)")
    args = p.parse_args(argv)

    from benchmarks.common import claim_out, header, save_record
    from srd.config import load_config
    from srd.eval.breakdown import reference_words
    from srd.report import difference_cell, paired_difference

    preset = PRESETS[args.preset]
    out = Path(args.out)
    known = {"kd", "paper", *(v for v in preset.get("variants", {}) if v)}
    for row in args.rows:
        if row not in known:
            raise SystemExit(f"--rows {row}: not a row of preset {args.preset} (rows: {', '.join(sorted(known))})")
    base_cfg = out / run_names(args.preset, [args.divergence], [args.seeds[0]])[0][0] / "config.yaml"
    if not base_cfg.exists():
        raise SystemExit(f"{base_cfg} not found: --out must hold the base run of seed {args.seeds[0]}")
    cfg = load_config(base_cfg)
    check_variant_runs(out, preset, args)
    claim_out(out, "quality benchmark", own=("dev-rows",))  # its cache goes into quality.py's folder, no other
    if args.fresh < 0:
        raise SystemExit(f"--fresh {args.fresh}: give a number of dev rows, at least 1 (or leave it out)")
    dev = dev_rows(cfg, args.fresh)
    setting = (
        f"sampled at T = 1, each dev row's mean over seeds {args.sampled_seeds}" if args.sampled_seeds else "greedy"
    )

    per: dict[str, dict[int, dict[str, float]]] = {}  # row -> seed -> {dev row index: score}
    logged: dict[str, dict[int, float]] = {}
    decoded: dict[str, dict[int, float]] = {}
    answer_words: dict[str, dict[int, list[float]]] = {}  # row -> seed -> each dev row's answer words
    t0 = time.perf_counter()
    for row in args.rows:
        variant = "" if row in ("kd", "paper") else row
        for seed in args.seeds:
            name = run_names(args.preset, [args.divergence], [seed], [variant])[0][0]
            trained = out / name / "baseline" if row == "kd" else out / name
            found = best_checkpoint(trained)
            if found is None:
                print(f"{row}, seed {seed}: {out / name} not finished, left out", flush=True)
                continue
            model, best_dev = found
            tag = "sampled-" + "-".join(map(str, args.sampled_seeds)) if args.sampled_seeds else "greedy"
            tag += f"-fresh{args.fresh}" if args.fresh else ""
            cache = out / "dev-rows" / f"{name}{'-kd' if row == 'kd' else ''}-{tag}.json"
            scores, lengths, new = cached_scores(cache, cfg, trained, model, args.sampled_seeds, dev, args.fresh)
            per.setdefault(row, {})[seed] = {str(i): s for i, s in enumerate(scores)}
            if lengths is not None:
                answer_words.setdefault(row, {})[seed] = lengths
            logged.setdefault(row, {})[seed] = best_dev
            decoded.setdefault(row, {})[seed] = statistics.fmean(scores)
            print(
                f"{row}, seed {seed}: {decoded[row][seed]:.2f} (logged {best_dev:.2f}){' decoded now' if new else ''}",
                flush=True,
            )
    if args.rows[0] not in per:
        raise SystemExit(f"the reference row {args.rows[0]} has no finished seed in {out}")

    ref = args.rows[0]
    n = cfg.dev_eval.num_examples
    scored = (
        f"the {len(dev)} rows of `{cfg.data.dev}` after the runs' own {n} (rows {n}-{n + len(dev) - 1}: no "
        "checkpoint was chosen on them)"
        if args.fresh
        else f"{len(dev)} rows of `{cfg.data.dev}` (the runs' own dev rows)"
    )
    lines = header("Choosing on dev, over training seeds") + [
        f"Runs in `{out}` (preset `{args.preset}`, {args.divergence}); dev: {scored}, at most "
        f"{cfg.dev_eval.max_new_tokens} new tokens, {setting}. Each row's best checkpoint (chosen by the run's "
        "greedy dev ROUGE-L on its own dev rows) decoded again; ROUGE-L x100.",
        "",
        "| row | "
        + " | ".join(f"seed {s}: decoded (logged best)" if not args.fresh else f"seed {s}" for s in args.seeds)
        + " | mean over seeds | median answer words, seed by seed |",
        "|---|" + "---|" * (len(args.seeds) + 2),
    ]
    for row in args.rows:
        cells = [
            "-"
            if s not in decoded.get(row, {})
            else f"{decoded[row][s]:.2f}"
            if args.fresh
            else f"{decoded[row][s]:.2f} ({logged[row][s]:.2f})"
            for s in args.seeds
        ]
        mean = f"{statistics.fmean(decoded[row].values()):.2f}" if row in decoded else "-"
        # each seed's median over the dev rows (with sampled seeds, of each row's mean over them)
        by_seed = answer_words.get(row, {})
        median = ", ".join(f"{statistics.median(by_seed[s]):g}" if s in by_seed else "-" for s in args.seeds)
        lines.append(f"| {row} | " + " | ".join(cells) + f" | {mean} | {median} |")
    lines += ["", f"The references' median: {statistics.median(reference_words(ex) for ex in dev):g} words."]
    lines += [
        "",
        f"Each row minus `{ref}` on the seeds both finished: per dev row, the mean over those seeds; paired over "
        "the dev rows (mean difference [95% bootstrap interval], two-sided Wilcoxon p); then the sign seed by seed.",
        "",
        "| row | seeds | paired, seeds pooled | minus the reference, seed by seed | same sign |",
        "|---|---|---|---|---|",
    ]
    chosen = []
    for row in args.rows[1:]:
        seeds = [s for s in args.seeds if s in per.get(row, {}) and s in per[ref]]
        if not seeds:
            lines.append(f"| {row} | - | - | - | - |")
            continue
        d = paired_difference(pooled(per, ref, seeds), pooled(per, row, seeds))
        by_seed = [decoded[row][s] - decoded[ref][s] for s in seeds]
        same = sum((x > 0) == (d["diff"] > 0) and x != 0 for x in by_seed)
        lines.append(
            f"| {row} | {', '.join(map(str, seeds))} | {difference_cell(d)} | "
            + ", ".join(f"{x:+.2f}" for x in by_seed)
            + f" | {same} of {len(seeds)} |"
        )
        if d["significant"] and d["diff"] > 0 and same == len(seeds):
            chosen.append(row)
    lines += by_length(per, args.rows, args.seeds, dev)
    match = sum(abs(decoded[r][s] - logged[r][s]) < 0.005 for r in decoded for s in decoded[r])
    total = sum(len(v) for v in decoded.values())
    fidelity = (
        []
        if args.fresh
        else [
            "",
            f"Fidelity: {match} of {total} decoded means equal the logged best dev score to 0.01"
            + (
                " (greedy: the same answers the run's dev evaluation gave)."
                if not args.sampled_seeds
                else " (sampled: not expected to)."
            ),
        ]
    )
    lines += [
        "",
        f"Rule: a row replaces `{ref}` only if it is ahead with p < 0.05 and on every seed. "
        + (f"Chosen: {', '.join(chosen)}." if chosen else f"No row meets it: `{ref}` stays."),
        *fidelity,
        f"Decoding took {time.perf_counter() - t0:.0f} s this time (models already in {out / 'dev-rows'} are read).",
    ]
    save_record("\n".join(lines) + "\n", args.record, args.preset, "dev-choice")
    return 0


if __name__ == "__main__":
    sys.exit(main())
