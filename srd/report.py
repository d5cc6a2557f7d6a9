"""`srd compare` (a Table-1-style comparison of runs) and `srd report` (markdown + plots)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from srd.config import is_run_folder
from srd.eval.evaluate import load_example_scores
from srd.reflect.reflect import time_split
from srd.rundir import RunDir, StageDir
from srd.runtime import environments
from srd.utils import atomic_write_text, read_json, read_jsonl


class ReportError(ValueError):
    """A run directory lacks what a comparison or report needs; the message says what to run."""


def _read_json(path: Path) -> Any:
    return read_json(path)


SPREAD_WARN = 1.4  # a method's speed spread above this makes its seconds unfit for comparison


def speed_spread(stage_dirs: list[Path], block: int = 25) -> float | None:
    """How far the machine's speed moved while these stages trained: the median tokens/s of the
    fastest block of `block` optimizer steps over the slowest's, across the stages (each stage's
    first two steps, which load and warm up, left out; tokens/s, so that stages of longer rows
    compare). About 1.1 on a steady machine; None without a full block."""
    medians = []
    for d in stage_dirs:
        log = StageDir(d).train_log
        if not log.exists():
            continue
        rates = [r for r in (row.get("tokens_per_s") for row in read_jsonl(log, cut_ok=True)[2:]) if r]
        medians += [statistics.median(rates[i : i + block]) for i in range(0, len(rates) - block + 1, block)]
    return max(medians) / min(medians) if medians and min(medians) > 0 else None


def run_speed_spread(run: Path) -> float | None:
    """speed_spread over every stage of a run folder (stages/*)."""
    stages = RunDir(run).stages
    return speed_spread(sorted(p for p in stages.iterdir() if p.is_dir())) if stages.is_dir() else None


def speed_caveat(run: Path) -> str | None:
    """A sentence when the machine's speed moved during a run or its KD baseline, else None."""
    spreads = {"SRD": run_speed_spread(run), "the KD baseline": run_speed_spread(RunDir(run).baseline.path)}
    moved = {k: v for k, v in spreads.items() if v is not None and v > SPREAD_WARN}
    if not moved:
        return None
    which = ", ".join(f"{v:.1f}x in {k}" for k, v in moved.items())
    return (
        f"Timing caveat: the machine's speed moved during the runs (tokens/s of the fastest block of 25 optimizer "
        f"steps over the slowest: {which}; a steady machine gives about 1.1), so their wall times do not "
        "compare: rerun both on a machine that nothing else uses, or compare sample passes."
    )


def train_wall_time(run: Path) -> float | None:
    """Wall-clock seconds of a run's training (reflection included for srd run)."""
    if RunDir(run).results.exists():
        return float(_read_json(RunDir(run).results)["total_s"])
    if RunDir(run).as_stage.done.exists():
        return float(_read_json(RunDir(run).as_stage.done)["wall_time_s"])
    return None


def _eval_dir(run: Path, eval_name: str) -> Path:
    """Where a compared run's per-example results are: an `srd eval` output folder itself (it holds
    summary.json), else the run folder's eval/<eval_name>/."""
    return Path(run) if (Path(run) / "summary.json").exists() else RunDir(run).eval(eval_name)


def _eval_summary(run: Path, eval_name: str) -> dict[str, Any]:
    path = _eval_dir(run, eval_name) / "summary.json"
    if not Path(run).is_dir():
        raise ReportError(f"{run} is not a folder: name a run folder (output_dir/name) or an srd eval output folder")
    if not path.exists():
        raise ReportError(f"{path} does not exist: evaluate the run first (srd eval {run})")
    return _read_json(path)


# decoding.json's per-benchmark settings that compared evaluations must share, and how an error names them
_COMPARED_SETTINGS = {
    "n": "number of rows (eval.limit)",
    "rows": "set of rows (the benchmark file differs)",
    "prompt_format": "prompt format (data.prompt_format)",
    "max_prompt_len": "prompt length (data.max_prompt_len)",
    "no_repeat_ngram_size": "no_repeat_ngram_size",
}


def _decoding_settings(run: Path, eval_name: str) -> dict[str, dict[str, Any]]:
    """Each benchmark's decoding settings as the evaluation folder recorded them (srd eval's
    decoding.json), {} for a folder from before that record."""
    path = _eval_dir(run, eval_name) / "decoding.json"
    return _read_json(path).get("benchmarks", {}) if path.exists() else {}


def wilcoxon_p(a: dict[str, float], b: dict[str, float]) -> tuple[float, int]:
    """Two-sided Wilcoxon signed-rank p-value on paired per-example scores (ids in both)."""
    from scipy.stats import wilcoxon

    ids = sorted(set(a) & set(b))
    diffs = [b[i] - a[i] for i in ids]
    if not ids or all(d == 0 for d in diffs):
        return 1.0, len(ids)
    return float(wilcoxon(diffs).pvalue), len(ids)


def paired_difference(
    a: dict[str, float], b: dict[str, float], *, confidence: float = 0.95, n_resamples: int = 10_000, seed: int = 0
) -> dict[str, Any]:
    """b minus a on the examples both scored: the mean difference, its bootstrap interval (BCa,
    resampling examples, `confidence` level, seeded) and the two-sided Wilcoxon p-value.

    Returns {"n", "diff", "low", "high", "p", "significant"}; significant means p < 1 - confidence
    (the interval then usually excludes 0 as well; the two can disagree near the boundary)."""
    import numpy as np
    from scipy.stats import bootstrap

    ids = sorted(set(a) & set(b))
    diffs = np.array([b[i] - a[i] for i in ids], dtype=np.float64)
    p, n = wilcoxon_p(a, b)
    if n == 0:
        return {"n": 0, "diff": float("nan"), "low": float("nan"), "high": float("nan"), "p": 1.0, "significant": False}
    diff = float(diffs.mean())
    if n < 3 or np.all(diffs == diffs[0]):  # no spread to resample
        low = high = diff
    else:
        res = bootstrap(
            (diffs,), np.mean, confidence_level=confidence, n_resamples=n_resamples, method="BCa", random_state=seed
        )
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
        if not (math.isfinite(low) and math.isfinite(high)):  # BCa degenerate: fall back to percentiles
            res = bootstrap(
                (diffs,),
                np.mean,
                confidence_level=confidence,
                n_resamples=n_resamples,
                method="percentile",
                random_state=seed,
            )
            low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return {"n": n, "diff": diff, "low": low, "high": high, "p": p, "significant": p < 1 - confidence}


def difference_cell(d: dict[str, Any]) -> str:
    """`+1.23 [-0.40, +2.85], p = 0.14, not significant` for a paired_difference result."""
    if not d["n"]:
        return "-"
    words = "significant" if d["significant"] else "not significant"
    return f"{d['diff']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}], p = {d['p']:.2g}, {words}"


def _short_names(paths: list[Path]) -> list[str]:
    """Each folder's name, with as many parent folders as it takes to tell them apart
    (runs/a/eval/greedy and runs/b/eval/greedy: a/eval/greedy and b/eval/greedy)."""
    parts = [Path(p).resolve().parts for p in paths]
    for depth in range(1, max(len(x) for x in parts) + 1):
        names = ["/".join(x[-depth:]) for x in parts]
        if len(set(names)) == len(names):
            return names
    return [str(p) for p in paths]


def compare_runs(runs: list[Path], *, eval_name: str = "sampled", labels: list[str] | None = None) -> str:
    """Markdown: scores per benchmark, average, gain and time reduction vs the first run, p-values."""
    summaries = [_eval_summary(r, eval_name) for r in runs]
    benches = list(dict.fromkeys(b for s in summaries for b in s["benchmarks"]))
    names = labels or _short_names(runs)
    settings = [_decoding_settings(r, eval_name) for r in runs]
    for b in benches:  # one decoding per benchmark, or the table would set unlike scores side by side
        seen = {
            name: (s["benchmarks"][b].get("sampling"), s["benchmarks"][b].get("max_new_tokens"))
            for name, s in zip(names, summaries)
            if b in s["benchmarks"]
        }
        if len(set(seen.values())) > 1:
            how = "; ".join(
                f"{n}: {'sampled' if sampled else 'greedy'}, {tokens} new tokens"
                for n, (sampled, tokens) in seen.items()
            )
            raise ReportError(
                f"{b} was decoded differently in the compared runs ({how}): compare evaluations made with the same "
                "decoding (srd eval --greedy or --seeds, --max-new-tokens)"
            )
        recorded = {
            n: {"n": s["benchmarks"][b].get("n"), **st.get(b, {})}
            for n, st, s in zip(names, settings, summaries)
            if b in s["benchmarks"]
        }
        for key, what in _COMPARED_SETTINGS.items():  # what the evaluations recorded (decoding.json)
            values = {n: st[key] for n, st in recorded.items() if st.get(key) is not None}
            if len(set(map(repr, values.values()))) > 1:
                how = "; ".join(f"{n}: {v if key != 'rows' else v[:12]}" for n, v in values.items())
                raise ReportError(
                    f"{b} was evaluated with another {what} in the compared runs ({how}): compare evaluations of "
                    "the same rows made with the same settings"
                )
    ref = runs[0]
    ref_avg: float | None = None
    ref_time = train_wall_time(ref)
    head = ["run", *benches, "average", "gain vs " + names[0], "train time (s)", "time vs " + names[0]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for run, name, s in zip(runs, names, summaries):
        scores = [s["benchmarks"].get(b, {}).get("mean") for b in benches]
        valid = [x for x in scores if x is not None and not math.isnan(x)]
        avg = sum(valid) / len(valid) if len(valid) == len(benches) and valid else float("nan")
        if ref_avg is None:
            ref_avg = avg
        gain = "-" if run == ref else f"{100 * (avg - ref_avg) / ref_avg:+.1f}%" if ref_avg else "n/a"
        t = train_wall_time(run)
        reduction = "-" if run == ref or not (t and ref_time) else f"{100 * (t - ref_time) / ref_time:+.1f}%"
        cells = [
            name,
            *[("-" if x is None else f"{x:.2f}") for x in scores],
            f"{avg:.2f}",
            gain,
            "-" if t is None else f"{t:.0f}",
            reduction,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Difference vs {names[0]} on per-example scores (mean over seeds): mean, 95% bootstrap interval, "
        "two-sided Wilcoxon signed-rank p (significant: p < 0.05):",
        "",
        "| run | " + " | ".join(benches) + " |",
        "|" + "---|" * (len(benches) + 1),
    ]
    ref_eval = _eval_dir(ref, eval_name)
    for run, name in zip(runs[1:], names[1:]):
        cells = []
        for b in benches:
            a, c = load_example_scores(ref_eval, b), load_example_scores(_eval_dir(run, eval_name), b)
            d = paired_difference(a, c)
            cells.append(f"{difference_cell(d)} (n = {d['n']})" if d["n"] else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    dtypes = {n: d for n, d in zip(names, (_decoding_dtype(r, eval_name) for r in runs)) if d}
    if len(set(dtypes.values())) > 1:  # each score is its model's own, but not at one precision
        lines += [
            "",
            "The runs were decoded with weights in different precisions ("
            + "; ".join(f"{n}: {d}" for n, d in dtypes.items())
            + "): part of a difference can come from the precision (srd eval --dtype).",
        ]
    machines = {n: run_machines(r) for n, r in zip(names, runs)}
    if len({repr(m) for found in machines.values() for m in found}) > 1:  # times of two machines side by side
        lines += [
            "",
            "The train times come from more than one machine ("
            + "; ".join(
                f"{n}: {' then '.join(machine_text(m) for m in found)}" for n, found in machines.items() if found
            )
            + "): they do not compare; rerun the runs on one machine to compare their times.",
        ]
    same: dict[str, list[str]] = {}  # weights fingerprint -> the compared names that hold it
    for name, run in zip(names, runs):
        fingerprint = _decoding_record(run, eval_name).get("fingerprint")
        if fingerprint:
            same.setdefault(fingerprint, []).append(name)
    for fingerprint, holders in same.items():
        if len(holders) > 1:  # two rows of the table are one model: say so, not a difference between models
            lines += ["", f"{' and '.join(holders)} are evaluations of the same weights (fingerprint {fingerprint})."]
    return "\n".join(lines) + "\n"


# what a run's speed depends on, of what environment.jsonl records (srd.runtime.environment)
MACHINE_KEYS = ("cpu", "cpu_cores", "cpu_isa", "cpu_native_bf16", "cpu_malloc", "torch_threads", "torch", "gpu", "gpus")


def run_machines(run: Path) -> list[dict[str, Any]]:
    """The distinct machines a run's commands ran on (its environment.jsonl and its KD
    baseline's), in order; empty for a run from before srd recorded them."""
    found: list[dict[str, Any]] = []
    for log_file in (RunDir(run).environment_log, RunDir(run).baseline.environment_log):
        for *_, env in environments(log_file):
            machine = {k: env[k] for k in MACHINE_KEYS if k in env}
            if machine not in found:
                found.append(machine)
    return found


def machine_text(machine: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in machine.items())


def _decoding_dtype(run: Path, eval_name: str) -> str | None:
    """The weights' precision an evaluation folder decoded with (decoding.json), None if unrecorded."""
    return _decoding_record(run, eval_name).get("dtype")


def _decoding_record(run: Path, eval_name: str) -> dict[str, Any]:
    path = _eval_dir(run, eval_name) / "decoding.json"
    return _read_json(path) if path.exists() else {}


COMPARISON_MARK = "<!-- written by srd compare -->"


def write_comparison_file(path: Path, table: str) -> None:
    """`srd compare --out`: write the table to a new file, or replace one that srd compare wrote
    (it begins with COMPARISON_MARK); any other file is the user's and is refused, untouched."""
    path = Path(path)
    if path.is_dir():
        raise ReportError(f"{path} is a folder: give --out a file name, e.g. {path / 'comparison.md'}")
    if path.exists():
        with open(path, "rb") as f:
            head = f.read(len(COMPARISON_MARK.encode()))
        if head != COMPARISON_MARK.encode():
            raise ReportError(
                f"{path} already exists and srd compare did not write it: choose another --out "
                "(srd replaces only a table it wrote)"
            )
    atomic_write_text(path, f"{COMPARISON_MARK}\n{table}")


def length_table(models: list[tuple[str, Any]], examples: dict[str, list[Any]]) -> list[str]:
    """Markdown: for every (label, eval folder or folders, one per training seed) model, per
    benchmark of `examples` (name -> its rows), the mean answer words against the mean reference
    words on the same rows, their ratio, the share of answers shorter than their reference, the
    median answer words and the share of answers that loop until the token limit (a few such
    answers move a mean; the median shows whether the typical answer changed)."""
    from srd.eval.breakdown import length_summary

    benches = list(examples)
    lines = [
        "| model | "
        + " | ".join(f"{b}: answer / reference words (ratio, shorter; median answer, looping)" for b in benches)
        + " |",
        "|---|" + "---|" * len(benches),
    ]
    for label, folder in models:
        cells = []
        for b in benches:
            s = length_summary(folder, b, examples[b])
            cells.append(
                f"{s['answer_words']:.1f} / {s['reference_words']:.1f} ({s['ratio']:.2f}, "
                f"{100 * s['shorter_share']:.0f}%; {s['median_answer_words']:.0f}, {100 * s['loop_share']:.0f}%)"
                if s["n"]
                else "-"
            )
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def breakdown_table(
    reference: tuple[str, Any], candidates: list[tuple[str, Any]], bench: str, examples: list[Any]
) -> list[str]:
    """Markdown (each model an eval folder, or a list of them over training seeds): one benchmark
    split by reference-length bucket and by topic (where the rows carry one); per group the
    reference model's mean score and answer words, then each candidate's difference from it
    (mean [95% bootstrap interval], Wilcoxon p; bold: p < 0.05) and its answer words."""
    from srd.eval.breakdown import breakdown

    per = [breakdown(reference[1], folder, bench, examples) for _, folder in candidates]
    if not per or not per[0]:
        return []
    head = ["group", "n", "reference words", f"{reference[0]}: score (words)"] + [
        f"{label}: minus {reference[0]} (words)" for label, _ in candidates
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for i, g in enumerate(per[0]):
        cells = [g["group"], str(g["n"]), f"{g['reference_words']:.0f}", f"{g['score'][0]:.2f} ({g['words'][0]:.0f})"]
        for rows in per:
            h = rows[i] if i < len(rows) and rows[i]["group"] == g["group"] else None
            if h is None:
                cells.append("-")
                continue
            d = paired_difference(*h["pairs"])
            mark = "**" if d["significant"] else ""
            interval = f"[{d['low']:+.2f}, {d['high']:+.2f}]"
            cells.append(f"{mark}{d['diff']:+.2f}{mark} {interval}, p = {d['p']:.2g} ({h['words'][1]:.0f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


# --------------------------------------------------------------------------------------
# report


def _stage_dirs(run: Path) -> list[Path]:
    stages = RunDir(run).stages
    if stages.exists():
        found = sorted((d for d in stages.iterdir() if d.is_dir()), key=lambda d: (d.name != "baseline", d.name))
        return [d for d in found if StageDir(d).logs.exists()]
    return [run] if StageDir(run).logs.exists() else []


def _top_k(run: Path) -> str:
    import yaml

    try:
        return str(yaml.safe_load(RunDir(run).config.read_text())["loss"]["teacher_top_k"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return "k"


def _plot_reflection(run: Path, plots: Path) -> list[str]:
    import matplotlib.pyplot as plt

    manifest = read_jsonl(RunDir(run).manifest, missing_ok=True)
    if not manifest:
        return []
    scorers = list(manifest[0]["scores"])
    kept = [r for r in manifest if r["kept"]]
    cut = min(r["fused"] for r in kept) if kept else None
    fig, axes = plt.subplots(1, len(scorers) + 1, figsize=(4.5 * (len(scorers) + 1), 3.6))
    for ax, s in zip(axes, scorers):
        ax.hist(
            [[r["scores"][s] for r in manifest if r["kept"]], [r["scores"][s] for r in manifest if not r["kept"]]],
            bins=20,
            stacked=True,
            label=["kept", "dropped"],
            color=["tab:blue", "tab:gray"],
        )
        ax.set_title(f"reflection score: {s}")
        ax.set_xlabel(s + (" (x100)" if s == "rouge_l" else " (nats/token)" if s == "ce" else ""))
        ax.set_ylabel("examples")
        ax.legend()
    ax = axes[-1]
    ax.hist([r["fused"] for r in manifest], bins=20, color="tab:green")
    if cut is not None:
        ax.axvline(cut, color="red", linestyle="--", label=f"selection cut ({len(kept)}/{len(manifest)} kept)")
        ax.legend()
    ax.set_title("fused score (reciprocal rank fusion)")
    ax.set_xlabel("sum 1/(k + rank); higher = easier")
    ax.set_ylabel("examples")
    fig.tight_layout()
    fig.savefig(plots / "reflection_scores.png", dpi=110)
    plt.close(fig)
    stages = sorted({r["stage"] for r in kept})
    fig, ax = plt.subplots(figsize=(5, 3.4))
    # positions + tick labels: string categories that look like numbers make matplotlib log
    xs = list(range(len(stages)))
    ax.bar(xs, [sum(r["stage"] == s for r in kept) for s in stages], color="tab:blue")
    ax.set_xticks(xs, [str(s) for s in stages])
    ax.set_title("curriculum slice sizes")
    ax.set_xlabel("stage (easy -> hard)")
    ax.set_ylabel("examples in the slice")
    fig.tight_layout()
    fig.savefig(plots / "stage_sizes.png", dpi=110)
    plt.close(fig)
    return ["reflection_scores.png", "stage_sizes.png"]


def _dev_series(rows: list[dict[str, Any]]) -> tuple[str, list[tuple[int, float]]]:
    """The dev curve a stage logged: ROUGE-L of generated answers when it generated them, else
    the dev cross-entropy (comparable across stages, unlike the loss, whose tau and alpha change)."""
    for key in ("dev_rougeL", "dev_ce"):
        points = [(e["step"], e[key]) for e in rows if key in e]
        if points:
            return key, points
    return "", []


def dev_over_time(run: Path) -> list[tuple[float, float]]:
    """(seconds, dev ROUGE-L) of every dev evaluation of a run, on the method's own clock: its
    reflection and teacher cache first (results.json), then each stage's clock when the score was
    known (the evaluation's elapsed_s in eval.jsonl; in runs older than that field, the evaluated
    step's elapsed_s in train.jsonl, step 0 at the stage's start), stage after stage. Empty when
    the run generated no dev answers."""
    res = _read_json(RunDir(run).results) if RunDir(run).results.exists() else {}
    offset = float(res.get("reflection_s") or 0.0) + float(res.get("teacher_cache_s") or 0.0)
    points: list[tuple[float, float]] = []
    for d in _stage_dirs(run):
        elapsed = {r["step"]: r["elapsed_s"] for r in read_jsonl(StageDir(d).train_log, missing_ok=True, cut_ok=True)}
        for e in read_jsonl(StageDir(d).eval_log, missing_ok=True, cut_ok=True):
            if "dev_rougeL" in e:
                at = e.get("elapsed_s", elapsed.get(e["step"], 0.0 if e["step"] == 0 else float("nan")))
                points.append((offset + at, e["dev_rougeL"]))
        done = StageDir(d).done
        offset += _read_json(done)["wall_time_s"] if done.exists() else max(elapsed.values(), default=0.0)
    return [p for p in points if math.isfinite(p[0])]


def _plot_training(run: Path, plots: Path) -> list[str]:
    import matplotlib.pyplot as plt

    dirs = _stage_dirs(run)
    if not dirs:
        return []
    evals = {d: read_jsonl(StageDir(d).eval_log, missing_ok=True, cut_ok=True) for d in dirs}
    keys = {_dev_series(rows)[0] for rows in evals.values()} - {""}
    key = "dev_rougeL" if "dev_rougeL" in keys else ("dev_ce" if keys else "")
    fig, axes = plt.subplots(1, 2 if key else 1, figsize=(11 if key else 6, 3.8), squeeze=False)
    ax1 = axes[0][0]
    offset, boundaries, dev_x, dev_y, taus, alphas = 0, [], [], [], [], []
    for d in dirs:
        rows = read_jsonl(StageDir(d).train_log, missing_ok=True, cut_ok=True)
        ax1.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], label=d.name, linewidth=1)
        for e in evals[d]:
            if key in e:
                dev_x.append(offset + e["step"])
                dev_y.append(e[key])
        if rows:
            taus.append(rows[0]["tau"])
            alphas.append(rows[0]["alpha"])
            offset += rows[-1]["step"]
            boundaries.append(offset)
    for b in boundaries[:-1]:
        for ax in axes[0]:
            ax.axvline(b, color="gray", linestyle=":")
    ax1.set_title("training loss")
    ax1.set_xlabel("optimizer step (all stages)")
    ax1.set_ylabel("alpha CE + (1-alpha) tau^2 D")
    ax1.legend(fontsize=8)
    if key:  # no empty panel: a run without dev rows has no dev curve to show
        ax2 = axes[0][1]
        ax2.plot(dev_x, dev_y, marker="o")
        rouge = key == "dev_rougeL"
        ax2.set_title("dev ROUGE-L (greedy)" if rouge else "dev cross-entropy of the references")
        ax2.set_xlabel("optimizer step (all stages)")
        ax2.set_ylabel("ROUGE-L F x100" if rouge else "nats per token")
    fig.tight_layout()
    fig.savefig(plots / "training.png", dpi=110)
    plt.close(fig)
    names = ["training.png"]
    if len(taus) > 1:
        fig, ax = plt.subplots(figsize=(5, 3.4))
        xs = list(range(1, len(taus) + 1))
        ax.plot(xs, taus, marker="o", label="tau (temperature)")
        ax.plot(xs, alphas, marker="s", label="alpha (CE weight)")
        ax.set_xticks(xs)
        ax.set_title("per-stage schedule")
        ax.set_xlabel("stage")
        ax.set_ylabel("value")
        ax.legend()
        fig.tight_layout()
        fig.savefig(plots / "schedule.png", dpi=110)
        plt.close(fig)
        names.append("schedule.png")
    return names


def _plot_eval(run: Path, plots: Path) -> tuple[list[str], list[str]]:
    import matplotlib.pyplot as plt

    tables, names = [], []
    evals = RunDir(run).evals
    for folder in sorted(evals.glob("*/summary.json")) if evals.exists() else []:
        summary = _read_json(folder)
        benches = list(summary["benchmarks"])
        tables.append(f"**{folder.parent.name}**\n\n" + (folder.parent / "summary.md").read_text())
        fig, ax = plt.subplots(figsize=(1.6 * len(benches) + 2, 3.4))
        means = [summary["benchmarks"][b]["mean"] for b in benches]
        stds = [summary["benchmarks"][b]["std"] for b in benches]
        ax.bar(benches, means, yerr=stds, capsize=4, color="tab:purple")
        ax.set_title(f"evaluation ({folder.parent.name})")
        ax.set_ylabel("score (ROUGE-L / BLEU / accuracy / pass@1, x100)")
        fig.tight_layout()
        name = f"eval_{folder.parent.name}.png"
        fig.savefig(plots / name, dpi=110)
        plt.close(fig)
        names.append(name)
    return names, tables


def method_label(method: str, on_policy_ratio: float = 0.0) -> str:
    """How a trained model is named in tables and plots: KD, GKD, KD+SRD, GKD+SRD, ..."""
    kd = "GKD" if on_policy_ratio > 0 or method == "gkd" else "KD"
    labels = {"srd": f"{kd}+SRD", "traditional": f"{kd}+curriculum", "baseline": kd, "gkd": kd}
    return labels.get(method, f"{kd} (SRD's tau/alpha schedule)" if method == "scheduled_kd" else method)


def _method_label(run: Path) -> str:
    res = _read_json(RunDir(run).results) if RunDir(run).results.exists() else {}
    return method_label(res.get("method", "srd"), res.get("on_policy_ratio") or 0.0)


def models_dirs(run: Path) -> list[tuple[str, Path]]:
    """(label, folder) of the trained models an experiment compares: the KD baseline, then the run."""
    base = RunDir(run).baseline.path
    return [
        (label, folder) for label, folder in [(_method_label(base), base), (_method_label(run), run)] if folder.exists()
    ]


def scores_by_benchmark(eval_dir: Path) -> dict[str, dict[str, float]]:
    """Benchmark -> example id -> score, for every benchmark of one evaluation folder with finished
    answers: a folder beside them with none (another tool's, one still being decoded) is left out,
    not drawn as a zero bar."""
    benches = sorted(p.name for p in Path(eval_dir).iterdir() if p.is_dir())
    return {b: v for b in benches if (v := load_example_scores(Path(eval_dir), b))}


def _plot_scores(series: list[tuple[str, Path]], plots: Path) -> str:
    """comparison.png: each model's mean score per benchmark with its 95% bootstrap interval over
    examples (left), and each model's paired difference from the first trained model, KD, with
    its 95% interval (right): a bar whose interval crosses zero is within noise."""
    import matplotlib.pyplot as plt
    import numpy as np
    from scipy.stats import bootstrap

    scores = {label: scores_by_benchmark(folder) for label, folder in series}
    benches = list(dict.fromkeys(b for s in scores.values() for b in s))
    labels = list(scores)
    reference = next((x for x in labels if x in ("KD", "GKD")), None)
    fig, axes = plt.subplots(1, 2 if reference else 1, figsize=(11 if reference else 6, 3.8), squeeze=False)
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        means, lows, highs = [], [], []
        for b in benches:
            v = np.array(list(scores[label].get(b, {}).values()), dtype=np.float64)
            m = float(v.mean()) if v.size else 0.0
            if v.size > 2 and np.ptp(v) > 0:
                ci = bootstrap(
                    (v,), np.mean, confidence_level=0.95, n_resamples=2000, method="percentile", random_state=0
                )
                lo, hi = float(ci.confidence_interval.low), float(ci.confidence_interval.high)
            else:
                lo = hi = m
            means.append(m)
            lows.append(m - lo)
            highs.append(hi - m)
        xs = [j + i * width for j in range(len(benches))]
        axes[0][0].bar(xs, means, width, yerr=[lows, highs], capsize=3, label=label, color=f"C{i}")
    axes[0][0].set_xticks([j + 0.4 - width / 2 for j in range(len(benches))], benches)
    axes[0][0].set_ylabel("score (x100), 95% interval")
    axes[0][0].set_title("evaluation")
    axes[0][0].legend(fontsize=8)
    if reference:
        others = labels[labels.index(reference) + 1 :]  # the trained models after KD (not the references)
        ax = axes[0][1]
        w = 0.8 / max(len(others), 1)
        for i, label in enumerate(others):
            ds = [
                paired_difference(scores[reference].get(b, {}), scores[label].get(b, {}), n_resamples=2000)
                for b in benches
            ]
            xs = [j + i * w for j in range(len(benches))]
            diffs = [0.0 if d["n"] == 0 else d["diff"] for d in ds]
            err = [
                [0.0 if d["n"] == 0 else d["diff"] - d["low"] for d in ds],
                [0.0 if d["n"] == 0 else d["high"] - d["diff"] for d in ds],
            ]
            ax.bar(xs, diffs, w, yerr=err, capsize=3, label=label, color=f"C{labels.index(label)}")
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.set_xticks([j + 0.4 - w / 2 for j in range(len(benches))], benches)
        ax.set_ylabel(f"minus {reference} (paired), 95% interval")
        ax.set_title(f"difference from {reference}")
        if others:
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(plots / "comparison.png", dpi=110)
    plt.close(fig)
    return "comparison.png"


def best_dev_rows(run: Path, seeds: Sequence[int] | None = None) -> dict[str, float] | None:
    """Each dev row's ROUGE-L at a run's best checkpoint (averaged over dev_eval seeds), in dev-row
    order, from the answers its dev evaluation kept (logs/dev-answers/); None where the run kept
    none. `seeds`: only answers decoded with exactly these dev_eval seeds (empty: greedy), else None."""
    rows = best_dev_answers(run, seeds)
    return None if rows is None else mean_by_id(rows, lambda row: float(row["score"]))


def mean_by_id(rows: Sequence[dict[str, Any]], value: Callable[[dict[str, Any]], float]) -> dict[str, float]:
    """Kept answers ({"id", ...} per dev row and seed) -> each id's mean of `value`, in first-seen order."""
    per: dict[str, list[float]] = {}
    for row in rows:
        per.setdefault(str(row["id"]), []).append(value(row))
    return {i: statistics.fmean(v) for i, v in per.items()}


def best_dev_answers(run: Path, seeds: Sequence[int] | None = None) -> list[dict[str, Any]] | None:
    """The answers a run's dev evaluation kept at its best checkpoint ({"id", "seed", "prediction",
    "score"} per dev row and dev_eval seed, in dev-row order), or None (as best_dev_rows)."""
    rd = RunDir(run)
    if not rd.results.exists():
        return None
    best = _read_json(rd.results).get("best_checkpoint") or {}
    if "stage" not in best or "step" not in best:
        return None
    kept = rd.stage(best["stage"]).dev_answers(int(best["step"]))
    if not kept.exists():
        return None
    rows = read_jsonl(kept)
    if seeds is not None and {row["seed"] for row in rows} != set(seeds or [None]):
        return None
    return rows


def dev_pair_line(run: Path) -> str | None:
    """One sentence: the method's best checkpoint minus the KD baseline's on each dev row, paired,
    so that a reader sees whether the dev difference that chose the checkpoints is more than noise."""
    kd, srd = best_dev_rows(RunDir(run).baseline.path), best_dev_rows(run)
    if not kd or not srd:
        return None
    d = paired_difference(kd, srd)
    if not d["n"]:
        return None
    kd_label = _method_label(RunDir(run).baseline.path)
    return (
        f"Dev ROUGE-L at the two best checkpoints, {_method_label(run)} minus {kd_label}, "
        f"paired over the {d['n']} dev rows: {difference_cell(d)} (Wilcoxon; 95% bootstrap interval). On a few "
        "hundred dev rows a gap under about half a point is seldom more than noise."
    )


def _experiment_section(run: Path, plots: Path) -> tuple[list[str], list[str]]:
    """SRD vs KD (and teacher / initial student) when `srd run` trained a baseline and evaluated."""
    import matplotlib.pyplot as plt

    if not RunDir(run).experiment.exists():
        return [], []
    experiment = _read_json(RunDir(run).experiment)
    timing = experiment["timing"]
    md = ["## Comparison", ""]
    if RunDir(run).comparison.exists():
        md += [RunDir(run).comparison.read_text(), ""]
    models = experiment.get("models") or {}
    if models:
        md += ["Models evaluated: " + "; ".join(f"{k} `{v}`" for k, v in models.items()) + ".", ""]
    names = []
    phases = [("reflection", timing.get("reflection_s", 0.0)), ("SRD training", timing.get("train_s", 0.0))]
    if timing.get("teacher_cache_s"):
        phases.append(("SRD teacher rows (store)", timing["teacher_cache_s"]))
    if "baseline_train_s" in timing:
        phases.append(("KD baseline training", timing["baseline_train_s"]))
    if timing.get("baseline_teacher_cache_s"):
        phases.append(("KD baseline teacher rows (store)", timing["baseline_teacher_cache_s"]))
    phases += [(f"eval: {m}", s) for m, s in timing.get("eval_s", {}).items()]
    md += (
        ["### Wall time", "", "| phase | wall time (s) |", "|---|---|"]
        + [f"| {k} | {v:.0f} |" for k, v in phases]
        + [""]
    )
    if timing.get("srd_time_fraction"):
        cached = " (the teacher rows each trained on included)" if timing.get("teacher_cache_s") else ""
        md += [
            f"SRD (reflection included) took {100 * timing['srd_time_fraction']:.0f}% of the KD baseline's "
            f"training time{cached} ({timing['srd_sample_passes']:.0f} vs {timing['baseline_sample_passes']:.0f} "
            "sample passes).",
            "",
        ]
    caveat = speed_caveat(run)
    if caveat:
        md += [f"**{caveat}**", ""]
    pair = dev_pair_line(run)
    if pair:
        md += [pair, ""]
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(phases) + 1.2))
    ax.barh([k for k, _ in phases][::-1], [v for _, v in phases][::-1], color="tab:orange")
    ax.set_xlabel("wall time (s)")
    ax.set_title("where the time went")
    fig.tight_layout()
    fig.savefig(plots / "timing.png", dpi=110)
    plt.close(fig)
    names.append("timing.png")
    models = [
        (label, RunDir(folder).evals)
        for label, folder in [
            ("teacher", RunDir(run).reference("teacher").path),
            ("student before KD", RunDir(run).reference("initial").path),
            (_method_label(RunDir(run).baseline.path), RunDir(run).baseline.path),
            (_method_label(run), run),
        ]
        if RunDir(folder).evals.exists()
    ]
    series = []
    for label, eval_root in models:
        summaries = sorted(eval_root.glob("*/summary.json"))
        if summaries:
            series.append((label, summaries[0].parent))
    if series:
        names.append(_plot_scores(series, plots))
    curves = [(label, dev_over_time(folder)) for label, folder in models_dirs(run)]
    curves = [(label, pts) for label, pts in curves if pts]
    if curves:
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        for label, pts in curves:
            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xlabel("wall-clock seconds of the method (reflection and teacher cache first)")
        ax.set_ylabel("dev ROUGE-L")
        ax.set_title("dev score against time")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(plots / "dev_over_time.png", dpi=110)
        plt.close(fig)
        names.append("dev_over_time.png")
    return md, names


def environment_section(log_file: Path) -> list[str]:
    """Where the run's commands ran (environment.jsonl), one line per distinct environment: its
    wall times are that machine's, and a run resumed elsewhere mixes two."""
    found = environments(log_file)
    if not found:
        return []
    md = ["## Where it ran", ""]
    for first, last, n, env in found:
        when = first if n == 1 else f"{first} to {last} ({n} commands)"
        md.append(f"- {when}: " + ", ".join(f"{k} {v}" for k, v in env.items()))
    machines = {repr({k: env[k] for k in MACHINE_KEYS if k in env}) for *_, env in found}
    if len(machines) > 1:
        md += ["", f"Its commands ran on {len(machines)} different machines: its wall times mix them."]
    elif len(found) > 1:
        md += ["", "One machine throughout; the lines differ in srd's commit or the libraries."]
    return [*md, ""]


def write_report(run: Path) -> Path:
    """Write run/report.md and run/report/*.png; returns the markdown path."""
    import matplotlib

    matplotlib.use("Agg")
    if not RunDir(run).config.exists():
        raise ReportError(f"{run} is not a run directory (no config.yaml)")
    if not is_run_folder(run):  # report.md and report/ are written there: only into a run srd made
        raise ReportError(
            f"{run} holds a config.yaml that srd did not write, so it is not an srd run: name the run folder "
            "that srd train / srd run made"
        )
    rd = RunDir(run)
    for record in (rd.results, rd.reflection_summary, rd.experiment):  # a damaged one is named before
        if record.exists():  # anything is written
            _read_json(record)
    plots = rd.report_assets
    plots.mkdir(parents=True, exist_ok=True)
    md = [f"# Report: {run.name}", ""]
    if RunDir(run).results.exists():
        res = _read_json(RunDir(run).results)
        md += [
            f"Method **{res['method']}**, divergence **{res['divergence']}**, {res['examples']} training examples.",
            "",
            f"Wall time: total {res['total_s']:.0f} s = reflection {res['reflection_s']:.0f} s + "
            f"training {res['train_s']:.0f} s"
            + (f" + teacher rows {res['teacher_cache_s']:.0f} s" if res.get("teacher_cache_s") else "")
            + f"; {res['sample_passes']:.0f} sample passes."
            + (
                f" On-policy batches (ratio {res['on_policy_ratio']:g}): {res['generation_s']:.0f} s of the training "
                "time went to the student's sampling."
                if res.get("generation_s")
                else ""
            )
            + (
                f" The teacher rows (top-{_top_k(run)} logits from the teacher store) cost "
                f"{res['teacher_cache_s']:.0f} s to build, counted in the total, not in the training time; "
                f"this run built {res.get('teacher_built_s', res['teacher_cache_s']):.0f} s of them, the rest was "
                "found in the store."
                if res.get("teacher_cache_s")
                else ""
            ),
            "",
            "| stage | examples | steps | tau | alpha | wall time (s) | dev ROUGE-L after |",
            "|---|---|---|---|---|---|---|",
        ]
        for s in res["stages"]:
            dev = (s.get("last_eval") or {}).get("dev_rougeL")
            md.append(
                f"| {s['stage']} | {s['examples']} | {s['steps']} | {s['tau']:.2f} | {s['alpha']:.2f} | "
                f"{s['wall_time_s']:.0f} | {'-' if dev is None else f'{dev:.2f}'} |"
            )
        md.append("")
        best = res.get("best_checkpoint")
        if best:
            md += [
                f"Best dev ROUGE-L: {best['dev_rougeL']:.2f}, {best['stage']} at step {best['step']} "
                f"(`stages/{best['stage']}/best`; what `eval.checkpoint=best` evaluates).",
                "",
            ]
    if RunDir(run).reflection_summary.exists():
        rs = _read_json(RunDir(run).reflection_summary)
        md += [
            "## Reflection",
            "",
            f"{rs['kept']} of {rs['examples']} examples kept; slice sizes "
            f"{rs['stage_sizes']}; {rs['wall_time_s']:.0f} s{time_split(rs)}.",
            "",
            "| score | min | median | mean | max |",
            "|---|---|---|---|---|",
        ]
        for s in rs["scorers"]:
            d = rs[s]
            md.append(f"| {s} | {d['min']:.2f} | {d['median']:.2f} | {d['mean']:.2f} | {d['max']:.2f} |")
        for pair, rho in rs.get("spearman_rank_correlation", {}).items():
            md += ["", f"Spearman rank correlation {pair}: {rho:.3f}."]
        md.append("")
    md += environment_section(rd.environment_log)
    exp_md, exp_images = _experiment_section(run, plots)
    md += exp_md
    images = exp_images + _plot_reflection(run, plots) + _plot_training(run, plots)
    eval_images, eval_tables = _plot_eval(run, plots)
    if eval_tables:
        md += ["## Evaluation of this run's model", "", *eval_tables]
    md += ["## Plots", ""] + [f"![{name}](report/{name})" for name in images + eval_images] + [""]
    path = RunDir(run).report
    atomic_write_text(path, "\n".join(md))
    return path
