"""`srd run` and `srd reflect`: SRD as a plan that calls the one-stage training loop.

    method: srd          reflection -> stage 1 .. n (Baby Step, tau/alpha schedules)
    method: baseline     plain KD on all the data (train.epochs, loss.tau, loss.alpha)
    method: traditional  curriculum by reference length + student token entropy, no filtering
                         (the paper's Table 6 baseline)
    method: scheduled_kd stage 1 .. n each on all the data with SRD's tau/alpha schedules, no
                         reflection (the control for SRD's rising temperature)

Every step is resumable from the run directory: reflection rows, stage checkpoints and
finished stages are reused when the same command is run again. Wall-clock time of the
reflection and of each stage is recorded in `results.json` (the paper's efficiency claim:
reflection 5-7% of the baseline's time, total -35%).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypedDict

from srd.config import ConfigError, RunConfig
from srd.curriculum import Stage, plan_full_stages, plan_stages, stage_alphas, stage_taus
from srd.recipes.train import check_inputs, load_models, prepare_run_dir
from srd.reflect.reflect import reflect, time_split
from srd.reflect.scorers import check_scorers, needs_teacher
from srd.rundir import RunDir
from srd.runtime import make_accelerator
from srd.train.checkpoint import load_weights
from srd.train.loop import StagePlan, StageSummary, train_stage
from srd.utils import atomic_write_json, folder_locks, read_json


class StageResult(TypedDict):
    """One stage in results.json."""

    stage: str  # stage-<i>, or baseline
    examples: int
    steps: int
    tau: float
    alpha: float
    epochs: float  # passes over the stage's examples
    wall_time_s: float  # steps, dev evaluations and checkpoints
    dev_eval_s: float
    generation_s: float
    teacher_cache_s: float
    best_metric: float | None
    complete: bool
    first_eval: dict[str, Any] | None
    last_eval: dict[str, Any] | None


class RunResults(TypedDict, total=False):
    """What `srd run` reports (results.json): the stages, the time of every phase, the models."""

    method: str
    divergence: str
    examples: int
    student_parameters: int
    trainable_parameters: int
    stages: list[StageResult]
    complete: bool
    reflection_s: float  # reflection, re-reflections included
    train_s: float  # every stage's clock: optimizer steps, dev evaluations, checkpoints
    dev_eval_s: float  # of which dev evaluations
    teacher_cache_s: float  # what the teacher rows it trained on cost to build (loss.teacher_top_k)
    teacher_built_s: float  # of which this run built (the rest was found in the teacher store)
    total_s: float  # reflection + training + the teacher rows: what the method cost
    sample_passes: float  # examples x epochs, summed over stages
    generation_s: float  # on-policy sampling inside training
    on_policy_ratio: float
    final_model: str  # the last stage's final/ folder
    best_model: str | None  # the best/ folder with the highest dev ROUGE-L over the stages
    best_checkpoint: dict[str, Any] | None  # {"model", "stage", "step", "dev_rougeL"}


def _needs_teacher(cfg: RunConfig) -> bool:
    if cfg.method in ("baseline", "gkd"):
        return cfg.loss.alpha < 1.0 or cfg.method == "gkd"
    return min(stage_alphas(cfg.curriculum)) < 1.0


def _setup(
    cfg: RunConfig, *, need_teacher: bool, data: tuple[list[Any], list[Any]] | None = None
) -> tuple[Any, Path, Any, Any, Any, list, list]:
    if cfg.method not in ("baseline", "gkd", "scheduled_kd"):
        check_scorers(
            _reflection_args(cfg).get("scorers", cfg.reflect.scorers), allow_code_execution=cfg.allow_code_execution
        )
        if _reflection_needs_teacher(cfg) and cfg.model.teacher is None:
            raise ConfigError(
                f"reflect.scorers {cfg.reflect.scorers} rank rows by the teacher's cross-entropy, but model.teacher "
                "is null: name a teacher, or use scorers of the student alone (rouge_l, ce)"
            )
    train, dev = check_inputs(cfg, need_teacher=need_teacher, data=data)  # before any weights are read
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    run_dir = prepare_run_dir(cfg) if acc.is_main_process else cfg.run_dir
    acc.wait_for_everyone()
    # a KD-only teacher whose rows are all in the teacher store is not loaded (the reflection's
    # teacher scorers and on-policy batches need the model: load_models checks)
    kd_only = need_teacher and not _reflection_needs_teacher(cfg)
    taus = stage_taus(cfg.curriculum) if cfg.method not in ("baseline", "gkd") else [cfg.loss.tau]
    student, teacher, tokenizer = load_models(
        cfg, need_teacher=need_teacher, data=(train, dev) if kd_only else None, accelerator=acc, taus=taus
    )
    return acc, run_dir, student, teacher, tokenizer, train, dev


def _reflection_args(cfg: RunConfig) -> dict[str, Any]:
    if cfg.method == "traditional":
        return {"scorers": ["length", "entropy"], "keep_ratio": 1.0}
    return {}


def _reflect(
    cfg: RunConfig,
    student: Any,
    tokenizer: Any,
    train: list,
    out_dir: Path,
    acc: Any,
    progress: bool,
    teacher: Any = None,
) -> list[dict[str, Any]]:
    """Reflection by `student` (as it is now) into `out_dir`; `teacher` for scorers relative to it."""
    return reflect(
        cfg,
        student=student,
        tokenizer=tokenizer,
        examples=train,
        out_dir=out_dir,
        accelerator=acc,
        progress=progress,
        teacher=teacher,
        **_reflection_args(cfg),
    )


def _reflection_needs_teacher(cfg: RunConfig) -> bool:
    return cfg.method in ("srd", "traditional") and needs_teacher(
        _reflection_args(cfg).get("scorers", cfg.reflect.scorers)
    )


@folder_locks()  # the run folder is this process's until it returns
def run_reflect(cfg: RunConfig, *, progress: bool = True) -> list[dict[str, Any]]:
    """`srd reflect`: only the reflection step, into runs/<name>/reflection/."""
    acc, run_dir, student, teacher, tokenizer, train, _ = _setup(cfg, need_teacher=_reflection_needs_teacher(cfg))
    run = RunDir(run_dir)
    manifest = _reflect(cfg, student, tokenizer, train, run.reflection, acc, progress, teacher)
    if acc.is_main_process:
        summary = read_json(run.reflection_summary)
        acc.print(
            f"reflection: {summary['examples']} examples, {summary['kept']} kept, "
            f"stages {summary['stage_sizes']}, {summary['wall_time_s']:.0f} s{time_split(summary)}"
        )
        acc.print(f"manifest: {run.manifest}")
    return manifest


@folder_locks()  # the run folder is this process's until it returns
def run_pipeline(
    cfg: RunConfig, *, progress: bool = True, data: tuple[list[Any], list[Any]] | None = None
) -> RunResults:
    """`srd run`: the whole method (or the baseline) from one config, resumable. `data`: the
    (training, dev) rows `load_data(cfg)` gave, where the caller has them already."""
    acc, run_dir, student, teacher, tokenizer, train, dev = _setup(
        cfg, need_teacher=_needs_teacher(cfg) or _reflection_needs_teacher(cfg), data=data
    )
    results: RunResults = {
        "method": cfg.method,
        "divergence": cfg.loss.divergence,
        "examples": len(train),
        "student_parameters": sum(p.numel() for p in student.parameters()),
        "trainable_parameters": sum(p.numel() for p in student.parameters() if p.requires_grad),
    }
    common = dict(teacher=teacher, tokenizer=tokenizer, dev_examples=dev, accelerator=acc, progress=progress)

    run = RunDir(run_dir)
    if cfg.method in ("baseline", "gkd"):
        stage = run.stage("baseline")
        summary = train_stage(cfg, student=student, train_examples=train, out_dir=stage.path, desc="baseline", **common)
        results["stages"] = [_stage_result("baseline", summary, len(train))]  # gkd: the same, on-policy batches
        results["reflection_s"] = 0.0
        final = stage.final
    else:
        if cfg.method == "scheduled_kd":
            stages = plan_full_stages([ex.id for ex in train], cfg.curriculum)
            results["reflection_s"] = 0.0
        else:
            manifest = _reflect(cfg, student, tokenizer, train, run.reflection, acc, progress, teacher)
            stages = plan_stages(manifest, cfg.curriculum)
            results["reflection_s"] = read_json(run.reflection_summary)["wall_time_s"]
        results["stages"] = []
        final = _train_curriculum(cfg, stages, run, results["stages"], student, train, common)
        if final is None:  # paused on purpose (train.stop_after_steps): resume later
            return {**results, "complete": False}
    if not results["stages"][-1].get("complete", True):
        return {**results, "complete": False}
    results["complete"] = True
    results["train_s"] = round(sum(s["wall_time_s"] for s in results["stages"]), 3)
    results["dev_eval_s"] = round(sum(s.get("dev_eval_s", 0.0) for s in results["stages"]), 3)
    # curriculum.re_reflect: the student reflects again before stages 2..n, time the method costs
    again = [folder / "summary.json" for folder in run.re_reflections()]
    results["reflection_s"] = round(results["reflection_s"] + sum(read_json(f)["wall_time_s"] for f in again), 3)
    # the teacher store: what the rows this run trained on cost to build, whether this run built
    # them or found them stored by another run (so a method's time does not depend on which ran
    # first), and what this run itself spent building (shards of an interrupted invocation too)
    built_s = sum(s.get("teacher_cache_s", 0.0) for s in results["stages"])
    record = read_json(run.teacher_store) if run.teacher_store.exists() else {}
    results["teacher_built_s"] = round(max(built_s, float(record.get("built_s", 0.0))), 3)
    results["teacher_cache_s"] = round(sum(record.get("rows_cost_s", {}).values()), 3) if record else 0.0
    # the rows are built before each stage's loop starts: not in train_s, but time the method costs
    results["total_s"] = round(results["train_s"] + results["reflection_s"] + results["teacher_cache_s"], 3)
    results["sample_passes"] = round(sum(s["examples"] * s["epochs"] for s in results["stages"]), 3)
    results["generation_s"] = round(sum(s.get("generation_s", 0.0) for s in results["stages"]), 3)
    results["on_policy_ratio"] = cfg.on_policy.ratio
    results["final_model"] = str(final)
    best = best_checkpoint(run_dir, [s["stage"] for s in results["stages"]])
    results["best_model"] = best and best["model"]
    results["best_checkpoint"] = best
    if acc.is_main_process:
        atomic_write_json(run.results, results)
        _print_results(run_dir, results, acc)
    return results


def _train_curriculum(
    cfg: RunConfig,
    stages: list[Stage],
    run: RunDir,
    stage_results: list[StageResult],
    student: Any,
    train: list,
    common: dict[str, Any],
) -> Path | None:
    """A staged plan (SRD's Baby Step: stage i trains on slices 1..i; scheduled_kd: every stage on
    all the data), each stage from stage i - 1's weights and one call of the one-stage training
    loop; each stage's result is appended to `stage_results`. The last stage's final/ folder, or
    None when a stage paused (train.stop_after_steps)."""
    acc, progress = common["accelerator"], common["progress"]
    by_id = {ex.id: ex for ex in train}
    c = cfg.curriculum
    steps = [
        StagePlan.make(
            [0] * len(s.example_ids),
            batch_size=cfg.train.batch_size,
            grad_accum=cfg.train.grad_accum,
            world=acc.num_processes,
            seed=0,
            epochs=c.epochs_per_stage,
            max_steps=None,
        ).total_steps
        for s in stages
    ]
    prev_final: Path | None = None
    for stage in stages:
        folder = run.stage(f"stage-{stage.index}")
        if prev_final is not None:
            load_weights(student, prev_final)  # Baby Step: continue from the previous stage
        ids = list(stage.example_ids)
        if c.re_reflect and stage.index > 1:
            ids = _re_reflect(
                cfg, student, common["tokenizer"], train, run.path, stage.index, acc, progress, common["teacher"]
            )
        if acc.is_main_process:
            atomic_write_json(
                folder.examples, {"stage": stage.index, "tau": stage.tau, "alpha": stage.alpha, "ids": ids}
            )
        window = (sum(steps[: stage.index - 1]), sum(steps)) if c.lr_schedule == "global" else None
        summary = train_stage(
            cfg,
            student=student,
            train_examples=[by_id[i] for i in ids],
            out_dir=folder.path,
            tau=stage.tau,
            alpha=stage.alpha,
            epochs=stage.epochs,
            max_steps=None,
            stage_taus=[s.tau for s in stages],  # one teacher cache serves every stage
            lr_window=window,
            eval_at_start=stage.index == 1,  # later stages start where the previous one was evaluated
            desc=f"stage {stage.index}/{len(stages)}",
            **common,
        )
        stage_results.append(_stage_result(f"stage-{stage.index}", summary, len(ids)))
        if not summary["complete"]:
            acc.print(f"paused in stage {stage.index} at step {summary['steps']}; rerun the command to resume")
            return None
        prev_final = folder.final
    return prev_final


def best_checkpoint(run_dir: Path, stage_names: list[str]) -> dict[str, Any] | None:
    """The exported best/ model with the highest dev ROUGE-L over the stages (the paper selects
    the checkpoint to evaluate by dev ROUGE-L): {"model", "stage", "step", "dev_rougeL"}; a tie
    goes to the later stage. None when no stage generated dev answers (dev loss alone does not
    compare across stages: each has its own tau and alpha)."""
    best: dict[str, Any] | None = None
    for name in stage_names:
        folder = RunDir(run_dir).stage(name).best
        path = folder / "metrics.json"
        metrics = read_json(path) if path.exists() else {}
        if "dev_rougeL" in metrics and (best is None or metrics["dev_rougeL"] >= best["dev_rougeL"]):
            best = {"model": str(folder), "stage": name, "step": metrics["step"], "dev_rougeL": metrics["dev_rougeL"]}
    return best


def _re_reflect(
    cfg: RunConfig,
    student: Any,
    tokenizer: Any,
    train: list,
    run_dir: Path,
    index: int,
    acc: Any,
    progress: bool,
    teacher: Any = None,
) -> list[str]:
    """Re-rank all data with the current student; stage `index` takes slices 1..index of the new ranking."""
    folder = RunDir(run_dir).re_reflection(index)
    manifest = _reflect(cfg, student, tokenizer, train, folder, acc, progress, teacher)
    return list(next(s for s in plan_stages(manifest, cfg.curriculum) if s.index == index).example_ids)


def _stage_result(name: str, summary: StageSummary, n_examples: int) -> StageResult:
    return {
        "stage": name,
        "examples": n_examples,
        "steps": summary["steps"],
        "tau": summary["tau"],
        "alpha": summary["alpha"],
        "epochs": summary["steps"] / max(summary["steps_per_epoch"], 1),
        "wall_time_s": summary["wall_time_s"],
        "dev_eval_s": summary.get("dev_eval_s", 0.0),
        "generation_s": summary.get("generation_s", 0.0),
        "teacher_cache_s": summary.get("teacher_cache_s", 0.0),
        "best_metric": summary["best_metric"],
        "complete": summary["complete"],
        "first_eval": summary.get("first_eval"),
        "last_eval": summary.get("last_eval"),
    }


def _print_results(run_dir: Path, results: dict[str, Any], acc: Any) -> None:
    acc.print(
        f"srd run ({results['method']}, {results['divergence']}) finished: total {results['total_s']:.0f} s "
        f"(reflection {results['reflection_s']:.0f} s, training {results['train_s']:.0f} s)"
    )
    for s in results["stages"]:
        dev = s.get("last_eval") or {}
        rouge = f", dev ROUGE-L {dev['dev_rougeL']:.2f}" if "dev_rougeL" in dev else ""
        acc.print(
            f"  {s['stage']}: {s['examples']} examples, {s['steps']} steps, tau {s['tau']:.2f}, "
            f"alpha {s['alpha']:.2f}, {s['wall_time_s']:.0f} s{rouge}"
        )
    first = (results["stages"][0].get("first_eval") or {}) if results["stages"] else {}
    last = (results["stages"][-1].get("last_eval") or {}) if results["stages"] else {}
    if "dev_rougeL" in first and "dev_rougeL" in last:
        acc.print(f"dev ROUGE-L: {first['dev_rougeL']:.2f} before training -> {last['dev_rougeL']:.2f} after")
    best = results.get("best_checkpoint")
    if best:
        acc.print(f"best dev ROUGE-L: {best['dev_rougeL']:.2f} ({best['stage']}, step {best['step']}): {best['model']}")
    acc.print(f"final model: {results['final_model']}; results: {run_dir / 'results.json'}")
