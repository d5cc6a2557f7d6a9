"""`srd run` as a whole experiment: the method, the plain-KD baseline, evaluation, report.

    1. run_pipeline(cfg)                the method (SRD: reflection -> curriculum)
    2. compare.baseline                 plain KD with the same divergence on all the data, into
                                        <run>/baseline/, for step_ratio^-1 of SRD's sample passes
                                        (the paper: 20 baseline epochs vs 8 per SRD stage)
    3. eval.benchmarks x eval.models    teacher, initial student, baseline, final model; each into
                                        its own eval/<greedy|sampled>/ (the layout of `srd eval`)
    4. comparison.md + report.md        Table-1-style table with Wilcoxon p-values, plots, timings

Every step is resumable: finished stages, runs and (benchmark, seed) files are reused.
`experiment.json` holds the wall time of every phase.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from srd.config import ConfigError, RunConfig, from_dict, to_dict
from srd.eval.benchmarks import resolve_benchmark
from srd.eval.evaluate import check_benchmarks, evaluate_model
from srd.recipes.pipeline import run_pipeline
from srd.recipes.train import load_data
from srd.report import compare_runs, method_label, speed_caveat, write_report
from srd.rundir import RunDir
from srd.runtime import make_accelerator
from srd.utils import atomic_write_json, atomic_write_text, folder_locks

LABELS = {"teacher": "teacher", "initial": "student before KD"}


def baseline_config(cfg: RunConfig, srd_results: dict[str, Any]) -> RunConfig:
    """The plain-KD baseline next to `cfg`: same models, data, divergence and optimizer,
    all the data, `train.epochs` chosen so that SRD's sample passes are `compare.step_ratio`
    of the baseline's (unless compare.baseline_epochs is set)."""
    epochs = cfg.compare.baseline_epochs
    if epochs is None:
        epochs = round(srd_results["sample_passes"] / (srd_results["examples"] * cfg.compare.step_ratio), 4)
    d = to_dict(cfg)
    # the same KD method without SRD: GKD when this run samples on-policy, plain KD otherwise
    method = "gkd" if (cfg.on_policy.ratio or 0) > 0 else "baseline"
    d.update(name="baseline", output_dir=str(cfg.run_dir), method=method, compare={}, eval={})
    d["train"].update(epochs=epochs, max_steps=None)
    return from_dict(RunConfig, d)


def eval_dirs(cfg: RunConfig) -> dict[str, Path]:
    """Where each evaluated model's run-like folder is (its results go to <folder>/eval/<mode>/)."""
    run = RunDir(cfg.run_dir)
    return {
        "teacher": run.reference("teacher").path,
        "initial": run.reference("initial").path,
        "baseline": run.baseline.path,
        "final": run.path,
    }


def eval_mode(cfg: RunConfig) -> str:
    return "greedy" if cfg.eval.greedy else "sampled"


def _evaluate_model(cfg: RunConfig, spec: str, folder: Path, acc: Any, progress: bool) -> float:

    if acc.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_json(folder / "model.json", {"model": spec})
    summary = evaluate_model(spec, cfg, RunDir(folder).eval(eval_mode(cfg)), accelerator=acc, progress=progress)
    # generation time of this config's benchmarks, earlier (resumed) invocations included
    names = {resolve_benchmark(b).name for b in cfg.eval.benchmarks}
    return sum(sum(v.get("wall_time_s", {}).values()) for k, v in summary["benchmarks"].items() if k in names)


def _evaluated(cfg: RunConfig, results: dict[str, Any], what: str) -> str:
    """The model of a run that eval.checkpoint names: its final weights, or its best dev ROUGE-L."""
    if cfg.eval.checkpoint == "final":
        return results["final_model"]
    best = results.get("best_model")
    if not best:
        raise ConfigError(
            f"eval.checkpoint=best: {what} has no checkpoint chosen by dev ROUGE-L (no stage's best/metrics.json "
            f"under {cfg.run_dir} holds dev_rougeL): check that data.dev has rows and dev_eval.num_examples > 0, "
            "or use eval.checkpoint=final"
        )
    return best


@folder_locks()  # the run folder is this process's until it returns
def run_experiment(cfg: RunConfig, *, progress: bool = True) -> dict[str, Any]:
    """`srd run`: the method, then (when configured) the baseline, evaluation and report."""

    if cfg.eval.checkpoint == "best" and cfg.compare.baseline and not cfg.train.eval_every and cfg.eval.benchmarks:
        print(
            "warning: eval.checkpoint=best with train.eval_every=0 evaluates only at each stage's end: the KD "
            "baseline (one stage) then has 2 candidate checkpoints and SRD one per stage plus one, which biases "
            "the comparison; set train.eval_every to evaluate both on the same schedule",
            file=sys.stderr,
        )
    # the rows read once: the benchmark check, the method and the KD baseline (the same data) share them
    data = load_data(cfg) if cfg.eval.benchmarks or cfg.compare.baseline else None
    if cfg.eval.benchmarks:  # a typo in a benchmark is found now, not after hours of training
        check_benchmarks(
            cfg.eval.benchmarks,
            data_dir=cfg.data.data_dir,
            limit=cfg.eval.limit,
            allow_code_execution=cfg.allow_code_execution,
            fmt=cfg.data.prompt_format,
            train=data[0],  # a benchmark row that is a training row too is said now
        )
    results = run_pipeline(cfg, progress=progress, data=data)
    if not results["complete"] or not (cfg.compare.baseline or cfg.eval.benchmarks):
        return results
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    run_dir = cfg.run_dir
    timing: dict[str, Any] = {
        "reflection_s": results["reflection_s"],
        "train_s": results["train_s"],
        "dev_eval_s": results.get("dev_eval_s", 0.0),
        "teacher_cache_s": results.get("teacher_cache_s", 0.0),
    }
    models = {"teacher": cfg.model.teacher, "initial": cfg.model.student, "final": _evaluated(cfg, results, "this run")}
    if cfg.compare.baseline:
        bcfg = baseline_config(cfg, results)
        acc.print(f"KD baseline: {bcfg.train.epochs:g} epochs over all {results['examples']} examples")
        base = run_pipeline(bcfg, progress=progress, data=data)
        if not base["complete"]:
            return {**results, "complete": False}
        timing["baseline_train_s"] = base["train_s"]
        timing["baseline_teacher_cache_s"] = base.get("teacher_cache_s", 0.0)
        timing["baseline_dev_eval_s"] = base.get("dev_eval_s", 0.0)
        base_total = base.get("total_s", base["train_s"])
        timing["srd_time_fraction"] = round(results["total_s"] / base_total, 4) if base_total else None
        timing["srd_sample_passes"] = results["sample_passes"]
        timing["baseline_sample_passes"] = base["sample_passes"]
        models["baseline"] = _evaluated(cfg, base, "the KD baseline")
    timing["eval_s"] = {}
    folders = eval_dirs(cfg)
    for name in cfg.eval.models if cfg.eval.benchmarks else []:
        if models.get(name) is None:
            continue
        acc.print(f"evaluating {name}: {models[name]}")
        timing["eval_s"][name] = round(_evaluate_model(cfg, models[name], folders[name], acc, progress), 3)
    if acc.is_main_process:
        atomic_write_json(RunDir(run_dir).experiment, {"models": models, "timing": timing})
        if cfg.eval.benchmarks:
            _write_comparison(cfg)

        report = write_report(run_dir)
        _print_headline(cfg, timing, report)
    acc.wait_for_everyone()
    return {**results, "experiment": timing}


def compared_runs(cfg: RunConfig) -> list[tuple[Path, str]]:
    """(folder, label) of every evaluated model, the reference (KD baseline if any) first."""
    folders = eval_dirs(cfg)
    order = ["baseline", "final", "teacher", "initial"] if "baseline" in cfg.eval.models else ["final"]
    order += [m for m in ["teacher", "initial"] if m not in order]

    ratio = cfg.on_policy.ratio or 0.0
    labels = {
        **LABELS,
        "baseline": method_label("baseline", ratio),
        "final": f"{method_label(cfg.method, ratio)} ({cfg.name})",
    }
    return [(folders[m], labels[m]) for m in order if m in cfg.eval.models]


def _write_comparison(cfg: RunConfig) -> None:

    pairs = compared_runs(cfg)
    table = compare_runs([p for p, _ in pairs], eval_name=eval_mode(cfg), labels=[label for _, label in pairs])
    e = cfg.eval
    decoding = "greedy" if e.greedy else f"sampling, seeds {e.seeds}"
    head = (
        f"Benchmarks {', '.join(e.benchmarks)}"
        + (f" (first {e.limit} rows each)" if e.limit else "")
        + f"; {decoding}; divergence {cfg.loss.divergence}"
        + (
            "; each trained model at its best dev ROUGE-L checkpoint (experiment.json names it)"
            * (e.checkpoint == "best")
        )
        + ". Train time includes reflection for SRD.\n\n"
    )
    atomic_write_text(RunDir(cfg.run_dir).comparison, head + table)


def _print_headline(cfg: RunConfig, timing: dict[str, Any], report: Path) -> None:
    comparison = RunDir(cfg.run_dir).comparison
    print()
    if comparison.exists():
        print(comparison.read_text(), end="")
    if timing.get("srd_time_fraction"):
        srd_s = timing["reflection_s"] + timing["train_s"] + timing.get("teacher_cache_s", 0.0)
        kd_s = timing["baseline_train_s"] + timing.get("baseline_teacher_cache_s", 0.0)
        print(
            f"\n{cfg.method} took {100 * timing['srd_time_fraction']:.0f}% of the KD baseline's time "
            f"({srd_s:.0f} s incl. reflection {timing['reflection_s']:.0f} s, vs {kd_s:.0f} s; teacher rows "
            f"included), with {timing['srd_sample_passes']:.0f} vs {timing['baseline_sample_passes']:.0f} "
            "sample passes"
        )
        caveat = speed_caveat(cfg.run_dir)
        if caveat:
            print(caveat)
    print(f"report: {report}")
