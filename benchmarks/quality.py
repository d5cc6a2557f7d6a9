"""Quality benchmark: KD+SRD against plain KD with the same divergence, teacher and data.

    python benchmarks/quality.py --preset paper-cpu           # the paper's regime + 6 ablation rows (hours)
    python benchmarks/quality.py --preset paper-cpu --plan    # each run's steps and dev evaluations
    python benchmarks/quality.py --preset cpu                 # ~2 h+ on 2 CPU cores, resumable
    python benchmarks/quality.py --preset gpu                 # the paper's protocol on one GPU
    python benchmarks/quality.py --preset gpu --random-init   # GPT-2 1.5B -> 124M shapes, timing only
    python benchmarks/quality.py --preset cpu --report-only   # rewrite the record from finished runs
    python benchmarks/quality.py --preset gsm8k               # SRD + answer_match vs SRD vs KD on GSM8K

Each (divergence, seed) is one `srd run` experiment (srd.recipes.experiment): reflection, the
3-stage curriculum, the plain-KD baseline at 1/0.6 of SRD's sample passes, and evaluation
of the teacher, the student before KD, KD and KD+SRD on DollyEval and SelfInst. Every
piece is resumable: rerun the same command after an interruption and finished reflection
rows, stages, runs and benchmark files are reused. The record (config, machine, wall
times, scores, Wilcoxon p-values) is written to benchmarks/results/ when all runs finish.

Presets:
  paper-cpu  the paper's regime on 200 Dolly rows (bundled teacher -> healed 20-layer student,
       forward KL, teacher top-64 cache, bf16): KD 20 epochs (500 steps) vs SRD 8 per stage
       (312 steps); dev ROUGE-L on 200 dev rows every 100 steps and at stage ends in every run;
       each model at its best dev checkpoint; DollyEval + SelfInst greedy and sampled (seeds 10,
       20); ablation rows against the same KD baseline: lambda 1, random order, tau fixed 1,
       lambda 0.9, the traditional curriculum, re-reflection before each stage; two selections
       relative to the teacher (ce_gap instead of ce; teacher_ce added); a cut stratified by
       reference length; two temperature
       controls with no reflection and no selection (method=scheduled_kd: KD's 20 epochs on all
       rows in three stages with SRD's alpha 0.3 -> 0.1 and tau 1 -> 2, or tau fixed at 2); the
       teacher and the initial student evaluated last. Pick rows with --variants, seeds with --seeds.
  cpu  the bundled SmolLM2-135M-Instruct teacher -> the healed 20-layer student
       (`srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80
       --out runs/students/smollm2-20l-healed`); the first 1,000 Dolly training rows;
       forward KL; 1 epoch per SRD stage (1,500 sample passes) vs 2.5 baseline epochs
       (2,500); batch 8; lr 1e-4; reflection with greedy 128 new tokens; full DollyEval
       (500) and SelfInst (242), greedy, 128 new tokens.
  gpu  all 11,435 Dolly rows, 8 epochs per stage vs 20 baseline epochs, batch 16 x 512
       tokens, training seed 42, sampled evaluation with seeds 10..50 (256 new tokens);
       teacher/student from --teacher/--student (default: the bundled teacher and the
       healed 20-layer student), or random-init GPT-2 1.5B -> 124M shapes (--random-init),
       whose scores mean nothing but whose times are the paper's setting.
  gsm8k  verifiable reflection (the paper's stated limitation): the bundled teacher -> a
       20-layer student healed on SAMSum/XSum only, so that GSM8K stays unseen
       (`srd prune ... --heal-data samsum xsum --out runs/students/smollm2-20l-healed-nogsm8k`);
       the first 400 GSM8K training problems with the chain-of-thought instruction; SRD with
       ROUGE-L + CE, SRD with answer_match added to the fusion (the same reflection answers,
       copied, not regenerated), and plain KD at the 60% step ratio; final-answer accuracy on
       the first 200 GSM8K test problems, greedy, 192 new tokens.
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

from benchmarks.common import claim_out, header, log_machine, save_record  # noqa: E402

HEALED_STUDENT = "runs/students/smollm2-20l-healed"

PRESETS: dict[str, dict[str, Any]] = {
    "cpu": {
        "seeds": [42],
        "divergences": ["fkl"],
        "overrides": {
            "model.teacher": "smollm2-135m-instruct",
            "model.student": HEALED_STUDENT,
            "data.train": "dolly",
            "data.train_limit": 1000,
            "data.dev": "dolly-dev",
            "data.dev_limit": 32,
            "data.max_prompt_len": 256,
            "data.max_len": 384,
            "loss.alpha": 0.2,
            "curriculum.epochs_per_stage": 1,
            "compare.baseline": True,
            "train.batch_size": 4,
            "train.grad_accum": 2,
            "train.lr": 1e-4,
            "train.save_every": 20,
            "generation.max_new_tokens": 128,
            "generation.batch_size": 16,
            "dev_eval.num_examples": 0,
            "eval.benchmarks": ["dolly-eval", "self-inst"],
            "eval.greedy": True,
            "eval.max_new_tokens": 128,
            "eval.batch_size": 16,
        },
        # the same SRD run with the teacher's top-64 log-probabilities cached once (issue 6's
        # quality check of the cache): same reflection answers (copied), same KD baseline
        "variants": {"": {}, "top64": {"loss.teacher_top_k": 64}},
        "labels": {"": "dense teacher", "top64": "teacher top-64 cache"},
    },
    "gpu": {
        "seeds": [42],
        "divergences": ["fkl"],
        "overrides": {
            "model.teacher": "smollm2-135m-instruct",
            "model.student": HEALED_STUDENT,
            "data.train": "dolly",
            "data.dev": "dolly-dev",
            "data.dev_limit": 500,
            "data.max_prompt_len": 256,
            "data.max_len": 512,
            "loss.alpha": 0.2,
            "curriculum.epochs_per_stage": 8,
            "compare.baseline": True,
            "train.batch_size": 16,
            "train.lr": 5e-5,
            "train.save_every": 500,
            "generation.max_new_tokens": 256,
            "generation.batch_size": 128,
            # the paper's protocol: evaluate each method at its best dev ROUGE-L checkpoint
            "dev_eval.num_examples": 100,
            "train.eval_every": 500,
            "eval.checkpoint": "best",
            "eval.benchmarks": ["dolly-eval", "self-inst"],
            "eval.greedy": False,
            "eval.batch_size": 128,
        },
    },
}
GSM8K_STUDENT = "runs/students/smollm2-20l-healed-nogsm8k"
COT = "Please reason step by step, and put your final answer within \\boxed{}."
PRESETS["gsm8k"] = {
    "seeds": [42],
    "divergences": ["fkl"],
    # SRD with ROUGE-L + CE (and its KD baseline), then SRD with answer_match added to the
    # fusion: same reflection rows (copied, not regenerated), same steps, no second baseline
    "variants": {
        "": {"reflect.scorers": ["rouge_l", "ce"]},
        "answer": {"reflect.scorers": ["rouge_l", "ce", "answer_match"]},
    },
    "labels": {"": "rouge_l+ce", "answer": "rouge_l+ce+answer_match"},
    "prepare": (
        f"srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 --heal-data samsum xsum "
        f"--out {GSM8K_STUDENT}"
    ),
    "overrides": {
        **PRESETS["cpu"]["overrides"],
        "model.student": GSM8K_STUDENT,
        "data.train": "gsm8k",
        "data.train_limit": 400,
        "data.dev": "gsm8k-test",
        "data.instruction_suffix": COT,
        "data.max_len": 512,
        "generation.max_new_tokens": 192,
        "generation.stop_strings": ["###"],
        "eval.benchmarks": ["gsm8k"],
        "eval.limit": 200,
        "eval.max_new_tokens": 192,
    },
}
RANDOM_INIT = {"model.teacher": "random:gpt2-xl", "model.student": "random:gpt2"}

# The paper's regime on a CPU (docs/method.md, sections 3 and 5): 20 KD epochs against 8 per SRD
# stage, checkpoints chosen by dev ROUGE-L on 200 dev rows evaluated every 100 optimizer steps in
# every run (the same schedule for every method), greedy and sampled evaluation, and one row per
# ablation, each against the same KD baseline
PAPER_CPU_ROWS = 200
PRESETS["paper-cpu"] = {
    "seeds": [42],
    "divergences": ["fkl"],
    "overrides": {
        **PRESETS["cpu"]["overrides"],  # the same teacher, student, data, lengths, optimizer and decoding
        "data.train_limit": PAPER_CPU_ROWS,
        "data.dev_limit": 200,
        "loss.teacher_top_k": 64,  # the teacher's forward paid once per example, not 20 times
        "curriculum.epochs_per_stage": 8,  # the baseline: 20 epochs (compare.step_ratio 0.6)
        # pinned, not auto: a run resumed on a machine without native bf16 continues in bf16
        # (slower there) instead of being refused for a precision change
        "train.precision": "bf16",
        "train.eval_every": 100,
        "train.save_every": 50,
        "train.keep_last": 0,
        "dev_eval.num_examples": 200,
        "dev_eval.max_new_tokens": 128,
        "eval.checkpoint": "best",
        "eval.batch_size": 32,
        "eval.dtype": "bfloat16",
    },
    # each ablation row trains once more against the base run's KD baseline; all but the
    # traditional curriculum reuse the base run's reflection answers (copied, not regenerated)
    "variants": {
        "": {},
        "lambda1": {"reflect.keep_ratio": 1.0},
        "random": {"curriculum.order": "random"},
        "tau1": {"curriculum.tau_schedule": "fixed"},
        "lambda09": {"reflect.keep_ratio": 0.9},
        "tcl": {"method": "traditional"},
        "rereflect": {"curriculum.re_reflect": True},
        # the temperature controls (no reflection, no selection): KD's 20 epochs on all rows in
        # three equal stages with SRD's alpha 0.3 -> 0.1, and tau rising 1 -> 2 or fixed at 2
        "kdrise": {"method": "scheduled_kd", "curriculum.epochs_per_stage": round(20 / 3, 4)},
        "kdtau2": {
            "method": "scheduled_kd",
            "curriculum.epochs_per_stage": round(20 / 3, 4),
            "curriculum.tau_schedule": "fixed",
            "curriculum.tau_start": 2.0,
        },
        # selections relative to the teacher (issue 35; chosen on dev): the student's CE replaced by
        # its gap to the teacher's, or the teacher's own CE added so that rows it cannot do drop first
        "cegap": {"reflect.scorers": ["rouge_l", "ce_gap"]},
        "teacherce": {"reflect.scorers": ["rouge_l", "ce", "teacher_ce"]},
        # the cut that keeps the data's mix of reference lengths (the easiest 75% of each quarter)
        "strat": {"reflect.stratify": "reference_length"},
        # the same cut, and every stage with the data's mix of lengths too: Baby Step trains stage
        # 1's rows in every stage, and easy -> hard over all rows makes stage 1 mostly short references
        "stratstages": {"reflect.stratify": "reference_length_stages"},
        # issue 35's last selection: re-reflection before each stage with the selection seed 42's dev
        # chose among cegap, teacherce and strat (strat; the rule was fixed before its score existed)
        "stratre": {"reflect.stratify": "reference_length", "curriculum.re_reflect": True},
        # SRD's selection and stages at the better control's temperature (tau 2 throughout): whether
        # the curation adds anything to a plain higher temperature (the kdtau2 control)
        "tau2": {"curriculum.tau_schedule": "fixed", "curriculum.tau_start": 2.0},
    },
    "labels": {
        "": "paper settings",
        "lambda1": "no selection (lambda = 1)",
        "random": "no curriculum (random order, same stages)",
        "tau1": "tau fixed at 1",
        "lambda09": "lambda = 0.9",
        "tcl": "traditional curriculum (length + entropy, no filtering)",
        "rereflect": "re-reflection before each stage",
        "kdrise": "control: KD with SRD's tau 1 -> 2 and alpha 0.3 -> 0.1 over 20 epochs, all rows",
        "kdtau2": "control: KD with tau fixed at 2 and alpha 0.3 -> 0.1 over 20 epochs, all rows",
        "cegap": "learnability: rank by student CE minus teacher CE instead of student CE",
        "teacherce": "teacher CE added to the fusion (rows the teacher cannot do drop first)",
        "strat": "cut stratified by reference length (the easiest 75% of each length quarter)",
        "stratstages": "cut and stages stratified by reference length (each stage: the next easiest of every quarter)",
        "stratre": "cut stratified by reference length, re-reflection before each stage",
        "tau2": "tau fixed at 2 (the kdtau2 control's temperature, with SRD's selection and stages)",
    },
    "own_reflection": ["tcl", "kdrise", "kdtau2"],  # kd*: no reflection at all
    "sampled_seeds": [10, 20],  # every trained model is also evaluated sampled at T = 1
    "references_last": True,  # the teacher and the student before KD after every trained model
}


def run_names(
    preset: str, divergences: list[str], seeds: list[int], variants: list[str] | None = None
) -> list[tuple[str, str, int, str]]:
    """(run name, divergence, seed, variant) of every run; variant "" is the one with the KD baseline."""
    return [
        (f"{preset}-{div}-s{seed}" + (f"-{v}" if v else ""), div, seed, v)
        for div in divergences
        for seed in seeds
        for v in variants or [""]
    ]


def overrides_for(
    preset: dict[str, Any],
    div: str,
    seed: int,
    name: str,
    out: Path,
    first: bool,
    extra: list[str],
    variant: str = "",
    references: tuple[str, ...] = ("teacher", "initial"),
) -> list[str]:
    o = dict(preset["overrides"])
    o.update(preset.get("variants", {}).get(variant, {}))
    o.update({"name": name, "output_dir": str(out), "seed": seed, "loss.divergence": div})
    # the teacher and the initial student are the same in every run: evaluate them once;
    # a variant compares against its base run's KD baseline instead of training another
    o["eval.models"] = [*references, "baseline", "final"] if first else ["baseline", "final"]
    if variant:
        o.update({"compare.baseline": False, "eval.models": ["final"]})
    elif "compare.baseline=false" in [x.replace(" ", "").lower() for x in extra]:
        # the SRD half of a split pair: its KD half was trained apart (quality_baseline.py)
        o["eval.models"] = [m for m in o["eval.models"] if m != "baseline"]
    return [f"{k}={json.dumps(v) if isinstance(v, (list, bool)) else v}" for k, v in o.items()] + extra


def _scores(folder: Path, mode: str) -> dict[str, Any]:
    path = folder / "eval" / mode / "summary.json"
    return json.loads(path.read_text())["benchmarks"] if path.exists() else {}


def share_reflection(base: Path, run: Path) -> None:
    """Copy the base run's reflection rows (student answers and statistics, no scores) into a
    variant run, so it fuses other scorers over the same answers without generating them again."""
    import shutil

    from srd.utils import TMP_TAG, mark_srd_folder

    src, dst = base / "reflection", run / "reflection"
    if dst.exists() or not (src / "meta.json").exists():
        return
    mark_srd_folder(run, "run")  # srd's run folder, which `srd run` then fills
    tmp = run / f".reflection{TMP_TAG}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in [src / "meta.json", *sorted(src.glob("outputs.rank*.jsonl"))]:
        shutil.copy2(f, tmp / f.name)
    tmp.rename(dst)


def eval_steps(total: int, every: int, at_start: bool) -> list[int]:
    """Optimizer steps at which a stage of `total` steps evaluates on dev (the loop's rule:
    every `every` steps and at its end; step 0 too for a run's first stage)."""
    points = ([0] if at_start else []) + [s for s in range(1, total + 1) if (every and s % every == 0) or s == total]
    return points


def plan(overrides: list[str]) -> dict[str, Any]:
    """What one `srd run` of these overrides will train, before it runs: per stage the examples,
    optimizer steps and dev-evaluation steps, and the same for its KD baseline (all of it from
    pure functions: stage sizes from the kept count, steps from the loop's batch plan)."""
    from srd.config import load_config
    from srd.curriculum import sample_passes
    from srd.reflect.fusion import n_kept, n_kept_stratified, partition_sizes
    from srd.train.loop import StagePlan

    cfg = load_config(None, overrides)
    n, t, c = cfg.data.train_limit, cfg.train, cfg.curriculum
    if n is None:
        raise ValueError("plan needs data.train_limit (the number of training rows)")

    def steps(examples: int, epochs: float) -> int:
        return StagePlan.make(
            [0] * examples,
            batch_size=t.batch_size,
            grad_accum=t.grad_accum,
            world=1,
            seed=0,
            epochs=epochs,
            max_steps=None,
        ).total_steps

    keep = 1.0 if cfg.method == "traditional" else cfg.reflect.keep_ratio
    kept = n_kept_stratified(n, keep, cfg.reflect.strata) if cfg.reflect.stratify != "none" else n_kept(n, keep)
    sizes = partition_sizes(kept, c.num_stages)
    cumulative = [sum(sizes[: i + 1]) for i in range(len(sizes))]
    if cfg.method == "scheduled_kd":  # every stage on all the rows
        cumulative = [n] * c.num_stages
    stages = []
    for i, size in enumerate(cumulative):
        total = steps(size, c.epochs_per_stage)
        stages.append({"examples": size, "steps": total, "evals": eval_steps(total, t.eval_every, i == 0)})
    out: dict[str, Any] = {"stages": stages, "sample_passes": sample_passes(cumulative, c.epochs_per_stage)}
    if cfg.compare.baseline:
        epochs = cfg.compare.baseline_epochs or round(out["sample_passes"] / (n * cfg.compare.step_ratio), 4)
        total = steps(n, epochs)
        out["baseline"] = {
            "examples": n,
            "epochs": epochs,
            "steps": total,
            "evals": eval_steps(total, t.eval_every, True),
        }
    return out


def bf16_notice(cfg: Any, native: bool) -> str | None:
    """A line for the start of a run whose resolved config pins bf16 (train.precision, eval.dtype)
    on a CPU that has no native bf16, where both run on a slow path: the preset's records were made
    in bf16, so it stays pinned (a resume keeps one precision), and the line names the float32 switch."""
    if native:
        return None
    pinned = [f"train.precision={cfg.train.precision}"] if cfg.train.precision == "bf16" else []
    pinned += [f"eval.dtype={cfg.eval.dtype}"] if cfg.eval.dtype == "bfloat16" else []
    if not pinned:
        return None
    return (
        f"note: this run pins {' and '.join(pinned)}, but this CPU has no native bf16 "
        "(AVX512-BF16 or AMX), where bf16 runs several times slower than float32. To run in float32 instead "
        "(faster here; scores not comparable digit for digit with bf16 records), start it with "
        "train.precision=fp32 eval.dtype=float32 and a new --out."
    )


def plan_table(commands: list[tuple[str, list[str]]]) -> list[str]:
    """Markdown: every run's stages (examples / optimizer steps / dev evaluations) and its baseline."""
    lines = [
        "| run | stages: examples x steps (dev evaluations) | steps | sample passes | dev every |",
        "|---|---|---|---|---|",
    ]
    for name, o in commands:
        pl = plan(o)
        every = ([x.split("=", 1)[1] for x in o if x.startswith("train.eval_every=")] or ["0"])[-1]
        stages = ", ".join(f"{s['examples']} x {s['steps']} ({len(s['evals'])})" for s in pl["stages"])
        total = sum(s["steps"] for s in pl["stages"])
        lines.append(f"| {name} | {stages} | {total} | {pl['sample_passes']:g} | {every} |")
        if "baseline" in pl:
            b = pl["baseline"]
            lines.append(
                f"| {name}/baseline (KD, {b['epochs']:g} epochs) | "
                f"{b['examples']} x {b['steps']} ({len(b['evals'])}) | {b['steps']} | "
                f"{b['examples'] * b['epochs']:g} | {every} |"
            )
    return lines


# written by quality_baseline.py where a pair's KD baseline was trained in a sitting of its own
SIDE_FILE = "baseline-side.json"


def _side(run: Path) -> dict[str, Any] | None:
    """The KD baseline's summary where quality_baseline.py trained it apart from SRD."""
    path = run / SIDE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def _without_compare(cfg: Any) -> dict[str, Any]:
    """A config as a dict without what the two halves of a split pair set apart: the compare
    section, the models evaluated and the output folder (the KD half may have run elsewhere)."""
    from srd.config import to_dict

    d = {k: v for k, v in to_dict(cfg).items() if k not in ("compare", "output_dir")}
    d["eval"] = {k: v for k, v in d["eval"].items() if k != "models"}
    return d


def _quality_eval_path(run: Path) -> Path:
    return run / "quality-eval.json"


def _add_eval_time(run: Path, key: str, model: str, seconds: float) -> None:
    from srd.utils import atomic_write_json

    path = _quality_eval_path(run)
    data = json.loads(path.read_text()) if path.exists() else {}
    data.setdefault(key, {})[model] = round(seconds, 3)
    atomic_write_json(path, data)


def evaluate_models(overrides: list[str], models: dict[str, str], seeds: list[int] | None, progress: bool) -> None:
    """Evaluate a run's models (name -> model path) greedy (seeds None) or sampled at T = 1 with
    `seeds`, into the folders `srd run` uses (eval/greedy, eval/sampled); resumable per
    (benchmark, seed). The seconds go to <run>/quality-eval.json."""
    from srd.config import load_config
    from srd.recipes.experiment import _evaluate_model, eval_dirs
    from srd.runtime import make_accelerator

    mode = ["eval.greedy=true"] if seeds is None else ["eval.greedy=false", f"eval.seeds={json.dumps(seeds)}"]
    cfg = load_config(None, overrides + mode)
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    for name, spec in models.items():
        print(f"evaluating {name} ({'greedy' if seeds is None else f'sampled, seeds {seeds}'}): {spec}", flush=True)
        seconds = _evaluate_model(cfg, spec, eval_dirs(cfg)[name], acc, progress)
        _add_eval_time(cfg.run_dir, "greedy_eval_s" if seeds is None else "sampled_eval_s", name, seconds)


def step_seconds(stage_dirs: list[Path]) -> list[float]:
    """Seconds of every optimizer step of these stages, from their train.jsonl (elapsed_s)."""
    out = []
    for d in stage_dirs:
        log = d / "logs" / "train.jsonl"
        if not log.exists():
            continue
        prev = 0.0
        for line in log.read_text().splitlines():
            row = json.loads(line)
            out.append(row["elapsed_s"] - prev)
            prev = row["elapsed_s"]
    return out


def median_steps(stages: list[list[float]]) -> tuple[str, float]:
    """Training seconds estimated stage by stage as steps x that stage's median step (a stage that
    shared the machine moves only its own median), as a cell (`56 x 3.61 + 104 x 2.99 = 513`) and
    its total."""
    parts = [(len(s), statistics.median(s)) for s in stages if s]
    total = sum(n * m for n, m in parts)
    return " + ".join(f"{n} x {m:.2f}" for n, m in parts) + f" = {total:.0f}", total


def _modes(preset: dict[str, Any]) -> list[str]:
    """The decodings a preset evaluates: its eval.greedy mode, plus sampled when sampled_seeds."""
    first = "greedy" if preset["overrides"].get("eval.greedy") else "sampled"
    return [first] + (["sampled"] if preset.get("sampled_seeds") and first == "greedy" else [])


def dev_curve(run: Path) -> str:
    """`stage-1: 0 12.3, 50 14.1 | stage-2: ...`: dev ROUGE-L at every evaluation of every stage."""
    parts = []
    for d in sorted(p for p in (run / "stages").glob("*") if p.is_dir()) if (run / "stages").exists() else []:
        log = d / "logs" / "eval.jsonl"
        rows = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
        points = [f"{r['step']} {r['dev_rougeL']:.2f}" for r in rows if "dev_rougeL" in r]
        if points:
            parts.append(f"{d.name}: " + ", ".join(points))
    return " / ".join(parts) or "-"


def _chosen(run: Path, model: str | None) -> str:
    res_path = run / "results.json"
    best = json.loads(res_path.read_text()).get("best_checkpoint") if res_path.exists() else None
    if best and model == best["model"]:
        return f"{best['stage']} step {best['step']} (dev {best['dev_rougeL']:.2f})"
    return "final weights"


def _timing(base: Path, run: Path, variant: str, preset: dict[str, Any]) -> dict[str, Any]:
    """One run's wall times, the KD baseline's from its base run; evaluation from experiment.json
    plus quality.py's own evaluations (sampled, references)."""
    base_exp = json.loads((base / "experiment.json").read_text())
    run_exp = json.loads((run / "experiment.json").read_text())
    t = {**base_exp["timing"]}
    t.update({k: v for k, v in run_exp["timing"].items() if v is not None})
    t["dev_eval_s"] = run_exp["timing"].get("dev_eval_s")  # the row's own, never its base run's
    side = _side(base)
    if "baseline_train_s" not in t and side:  # the KD half ran apart (quality_baseline.py)
        t.update(
            baseline_train_s=side["train_s"],
            baseline_teacher_cache_s=side.get("teacher_cache_s") or 0.0,
            baseline_dev_eval_s=side.get("dev_eval_s"),
            baseline_sample_passes=side["sample_passes"],
            split=True,
        )
    t.setdefault("teacher_cache_s", 0.0)
    if variant and variant not in preset.get("own_reflection", []):
        # the answers were the base run's: count its generation time, plus the variant's own
        # (the fusion over the copied rows; curriculum.re_reflect's later reflections)
        t["reflection_s"] = base_exp["timing"]["reflection_s"] + t["reflection_s"]
    t["srd_sample_passes"] = json.loads((run / "results.json").read_text())["sample_passes"]
    t["srd_total_s"] = t["reflection_s"] + t["train_s"] + t["teacher_cache_s"]
    # with loss.teacher_top_k each method counts what its teacher rows cost to build (teacher_cache_s),
    # whether it built them or found them in the teacher store (where the other method or seed put them)
    t["kd_total_s"] = t["baseline_train_s"] + t.get("baseline_teacher_cache_s", 0.0)
    t["srd_time_fraction"] = t["srd_total_s"] / t["kd_total_s"]
    t["eval_s"] = {"KD": _eval_seconds(base, "baseline"), "KD+SRD": _eval_seconds(run, "final")}
    return t


def _eval_seconds(run: Path, model: str) -> float:
    """Generation seconds of one evaluated model: srd run's evaluation plus quality.py's own."""
    exp = json.loads((run / "experiment.json").read_text())["timing"]["eval_s"]
    path = _quality_eval_path(run)
    extra = json.loads(path.read_text()) if path.exists() else {}
    return exp.get(model, 0.0) + sum(times.get(model, 0.0) for times in extra.values())


def write_record(args: argparse.Namespace, runs: list[tuple[str, str, int]], out: Path, wall: float | None) -> str:
    """The markdown record of every finished run: scores, differences against KD (mean, 95%
    bootstrap interval, Wilcoxon p), wall times, the evaluated checkpoints, dev curves."""
    from srd.eval.evaluate import load_example_scores
    from srd.report import difference_cell, paired_difference, run_speed_spread

    preset = PRESETS[args.preset]
    modes = _modes(preset)
    lines = header(
        f"Quality benchmark, preset `{args.preset}`{' (random-init shapes)' if args.random_init else ''}",
        runs=out,
        wrote_only=args.report_only,
    )
    first = out / runs[0][0]
    cfg_path = first / "config.yaml"
    if cfg_path.exists():
        lines += ["Resolved config of the first run:", "", "```yaml", cfg_path.read_text().rstrip(), "```", ""]
    rows: dict[str, list[tuple[str, dict[str, Any]]]] = {m: [] for m in modes}
    for m in modes:
        for ref, label in (("teacher", "teacher"), ("initial", "student before KD")):
            scores = _scores(first / "references" / ref, m)
            if scores:
                rows[m].append((label, scores))
    diffs: dict[str, list[str]] = {m: [] for m in modes}
    times, steps, evaluated, curves, unfinished = [], [], [], [], []
    finished: dict[tuple[str, str], dict[int, tuple[Path, Path]]] = {}  # (div, variant) -> seed -> (KD, SRD run)
    for name, div, seed, variant in runs:
        run = out / name
        base = out / name.removesuffix(f"-{variant}") if variant else run  # where the KD baseline is
        # finished: every mode evaluated on every benchmark, for the run and its KD baseline (a
        # summary lists a benchmark once all its decoding seeds are written): a record rewritten
        # while an evaluation is running leaves that run out rather than reading its partial files
        if not all(_evaluated_all(x, modes) for x in (base / "baseline", run)):
            unfinished.append(f"Run `{name}` is not finished (rerun the command to resume it).")
            # what it has done so far: the dev curves of its stages (and of the KD baseline)
            if not variant and (base / "baseline" / "stages").exists():
                curves.append(f"| KD ({div}, seed {seed}), unfinished | {dev_curve(base / 'baseline')} |")
            if (run / "stages").exists():
                curves.append(
                    f"| {div}, seed {seed}{f', {variant}' if variant else ''}, unfinished | {dev_curve(run)} |"
                )
            continue
        finished.setdefault((div, variant), {})[seed] = (base / "baseline", run)
        what = preset.get("labels", {}).get(variant)
        run_label = f"{div}, seed {seed}" + (f", {what}" if what and any(r[3] for r in runs) else "")
        scheduled = preset.get("variants", {}).get(variant, {}).get("method") == "scheduled_kd"
        label = f"{'KD, scheduled' if scheduled else 'KD+SRD'} ({run_label})"  # a control has no SRD
        for m in modes:
            kd, srd = _scores(base / "baseline", m), _scores(run, m)
            if not (kd and srd):
                continue
            if not variant:
                rows[m].append((f"KD ({div}, seed {seed})", kd))
            rows[m].append((label, srd))
            cells = []
            for b in srd:
                a = load_example_scores(base / "baseline" / "eval" / m, b)
                c = load_example_scores(run / "eval" / m, b)
                d = paired_difference(a, c)
                cells.append(f"{difference_cell(d)} (n = {d['n']})")
            diffs[m].append(f"| {run_label} | " + " | ".join(cells) + " |")
        base_exp = json.loads((base / "experiment.json").read_text())
        run_exp = json.loads((run / "experiment.json").read_text())
        kd_model, srd_model = base_exp["models"].get("baseline"), run_exp["models"].get("final")
        kd_model = kd_model or (_side(base) or {}).get("evaluated")
        evaluated.append(
            f"| {run_label} | `{kd_model}` | `{srd_model}` | {_chosen(base / 'baseline', kd_model)} | "
            f"{_chosen(run, srd_model)} |"
        )
        if not variant:
            curves.append(f"| KD ({div}, seed {seed}) | {dev_curve(base / 'baseline')} |")
        curves.append(f"| {run_label} | {dev_curve(run)} |")
        t = _timing(base, run, variant, preset)
        srd_stages = [step_seconds([d]) for d in sorted((run / "stages").glob("stage-*"))]
        kd_steps = step_seconds([base / "baseline" / "stages" / "baseline"])
        if any(srd_stages) and kd_steps:
            (srd_cell, srd_s), (kd_cell, kd_s) = median_steps(srd_stages), median_steps([kd_steps])
            spreads = [run_speed_spread(run), run_speed_spread(base / "baseline")]
            spread = " / ".join("-" if x is None else f"{x:.2f}" for x in spreads)
            steps.append(f"| {run_label} | {srd_cell} | {kd_cell} | {100 * srd_s / kd_s:.0f}% | {spread} |")
        srd_dev, kd_dev = t.get("dev_eval_s"), t.get("baseline_dev_eval_s")
        times.append(
            f"| {run_label} | {t['reflection_s']:.0f} | {t['teacher_cache_s']:.0f} | {t['train_s']:.0f} | "
            f"{'-' if srd_dev is None else f'{srd_dev:.0f}'} | {t['srd_total_s']:.0f} | "
            f"{t.get('baseline_teacher_cache_s', 0.0):.0f} | {t['baseline_train_s']:.0f} | "
            f"{'-' if kd_dev is None else f'{kd_dev:.0f}'} | "
            f"{t['kd_total_s']:.0f} | {100 * t['srd_time_fraction']:.0f}%{' (split)' if t.get('split') else ''} | "
            f"{t['srd_sample_passes']:.0f} / {t['baseline_sample_passes']:.0f} | "
            + ", ".join(f"{m} {s:.0f}" for m, s in t["eval_s"].items())
            + " |"
        )
    lines += unfinished + ([""] if unfinished else [])
    for m in modes:
        lines += _score_table(m, rows[m], preset)
        if diffs[m]:
            benches = list(dict.fromkeys(b for _, s in rows[m] for b in s))
            lines += [
                f"## KD+SRD minus KD, {m} (mean difference [95% bootstrap interval], two-sided Wilcoxon "
                "signed-rank p on per-example scores; significant: p < 0.05)",
                "",
                "| run | " + " | ".join(benches) + " |",
                "|---|" + "---|" * len(benches),
                *diffs[m],
                "",
            ]
    if finished:
        lines += seed_sections(finished, modes, preset, first)
    if times:
        lines += [
            "## Wall time (s)",
            "",
            "| run | reflection | teacher cache | SRD training | of which dev evaluations | SRD total "
            "| KD teacher cache | KD training | of which dev evaluations | KD total | SRD total / KD total "
            "| sample passes SRD / KD | evaluation (all decodings) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
            *times,
            "",
            "Training: the stages' own clocks (optimizer steps, dev evaluations, checkpoints). A `-` in a dev "
            "evaluation column marks a run made before that column was recorded: its stage clocks also leave out "
            "each stage's first and last dev evaluation and last checkpoint, which favours the method with more "
            "stages.",
            "",
        ]
        if any("(split)" in x for x in times):
            lines += [
                "(split): KD's half was trained and evaluated in a sitting of its own (quality_baseline.py), "
                "perhaps on a machine of another speed: that ratio, and the step-time ratio below, compare two "
                "sittings, not two methods on one machine.",
                "",
            ]
    if evaluated:  # final weights, or with eval.checkpoint=best each method's best dev ROUGE-L checkpoint
        lines += [
            "Models evaluated:",
            "",
            "| run | KD | KD+SRD | KD's checkpoint | KD+SRD's checkpoint |",
            "|---|---|---|---|---|",
            *evaluated,
            "",
        ]
    if any(not c.endswith("| - |") for c in curves):
        lines += [
            "Dev ROUGE-L at every evaluation (optimizer step, score) of every stage:",
            "",
            "| run | dev ROUGE-L |",
            "|---|---|",
            *curves,
            "",
        ]
    if steps:
        lines += [
            "Training time from the median step of each stage (robust to a machine shared with other work for "
            "part of a stage). Speed spread: the median tokens/s of the fastest block of 25 steps over the "
            "slowest's, across the method's stages (SRD / KD); about 1.1 on a steady machine. Where it is well "
            "above that, the machine's speed moved during the run, and neither its seconds nor its median step "
            "compare with another run's:",
            "",
            "| run | SRD: each stage's steps x its median s/step | KD steps x median s/step | SRD / KD "
            "| speed spread |",
            "|---|---|---|---|---|",
            *steps,
            "",
        ]
    if getattr(args, "note", None):
        lines += ["## Notes", ""] + [line for note in args.note for line in (note, "")]
    if wall is not None:
        lines += [
            f"This invocation ran for {wall / 60:.1f} min (finished parts of earlier invocations were reused).",
            "",
        ]
    return "\n".join(lines)


def _evaluated_all(folder: Path, modes: list[str]) -> bool:
    """Whether every mode's evaluation of `folder` lists the same benchmarks, at least one."""
    done = [set(_scores(folder, m)) for m in modes]
    return bool(done[0]) and all(d == done[0] for d in done)


def _row_label(preset: dict[str, Any], div: str, variant: str) -> str:
    """A row of the seed, length and breakdown tables: the base run is KD+SRD, a variant its label."""
    what = preset.get("labels", {}).get(variant)
    if not variant:
        return f"KD+SRD ({div}{f', {what}' if what else ''})"
    return f"{what or variant} ({div})"


def _seed_cells(pairs: list[tuple[int, Path, Path]], mode: str, bench: str) -> str:
    """Cells of one seed-table row for (seed, A run folder, B run folder) pairs: B minus A per seed,
    the mean and sd over seeds, how many seeds have B above A, and the pooled paired test."""
    from srd.eval.breakdown import example_scores
    from srd.report import paired_difference

    per, scored = [], []
    for pair in pairs:
        _, a_run, b_run = pair
        # a seed whose evaluation of this benchmark in this mode is still running (not yet in its
        # summary: some decoding seeds' files may be written, others not) is left out of the cell
        if not all(bench in _scores(run, mode) for run in (a_run, b_run)):
            continue
        a, c = example_scores(a_run / "eval" / mode, bench), example_scores(b_run / "eval" / mode, bench)
        ids = set(a) & set(c)
        if ids:
            per.append(statistics.fmean(c[i] - a[i] for i in ids))
            scored.append(pair)
    pairs = scored
    if not pairs:
        return "- | - | - | - | - |"
    pooled = paired_difference(
        example_scores([a_run / "eval" / mode for _, a_run, _ in pairs], bench),
        example_scores([b_run / "eval" / mode for _, _, b_run in pairs], bench),
    )
    spread = f" (sd {statistics.stdev(per):.2f})" if len(per) > 1 else ""
    mark = "**" if pooled["significant"] else ""
    return (
        f"{', '.join(str(seed) for seed, _, _ in pairs)} | "
        + " / ".join(f"{x:+.2f}" for x in per)
        + f" | {statistics.fmean(per):+.2f}{spread} | {sum(x > 0 for x in per)} of {len(per)} | "
        f"{mark}{pooled['diff']:+.2f}{mark} [{pooled['low']:+.2f}, {pooled['high']:+.2f}], p = {pooled['p']:.2g} |"
    )


SEEDS_LEGEND = (
    "Per seed: the mean per-example difference. Pooled: per-example scores averaged over the training seeds "
    "(and decoding seeds), then the mean difference [95% bootstrap interval] and the two-sided Wilcoxon p; "
    "bold: p < 0.05. A claim holds across seeds when the pooled test is significant and every seed has its sign."
)


def _seed_section(title: str, intro: str, columns: str, rows: list[str]) -> list[str]:
    """A seed table's markdown: title, intro, header (row, benchmark, seeds, `columns`, pooled)."""
    if not rows:
        return []
    head = f"| row | benchmark | training seeds | {columns} | pooled over seeds |"
    return [title, "", intro, "", head, "|---|---|---|---|---|---|---|", *rows, ""]


def seed_table(
    finished: dict[tuple[str, str], dict[int, tuple[Path, Path]]], mode: str, preset: dict[str, Any]
) -> list[str]:
    """Markdown: every row's difference from KD seed by seed, their mean and spread over seeds, how
    many seeds agree in sign, and one paired test on per-example scores averaged over the seeds
    (both the decoding seeds and the training seeds), so that a claim needs to hold across seeds."""
    out = []
    for (div, variant), by_seed in finished.items():
        pairs = [(seed, *by_seed[seed]) for seed in sorted(by_seed)]
        for b in _scores(pairs[0][2], mode):
            out.append(f"| {_row_label(preset, div, variant)} | {b} | " + _seed_cells(pairs, mode, b))
    return _seed_section(
        f"## Over training seeds, {mode}: each row minus KD of the same seed",
        SEEDS_LEGEND,
        "difference per seed | mean (sd over seeds) | seeds above KD",
        out,
    )


def versus_table(
    finished: dict[tuple[str, str], dict[int, tuple[Path, Path]]], mode: str, preset: dict[str, Any]
) -> list[str]:
    """Markdown: the paper's KD+SRD minus every other row (a temperature control, another
    selection) directly, on the training seeds both have: whether the curation adds anything to
    the temperature schedule is this difference, not the two rows' differences from KD."""
    out = []
    for (div, variant), by_seed in finished.items():
        base = finished.get((div, ""), {})
        seeds = sorted(set(by_seed) & set(base))
        if not variant or not seeds:
            continue
        pairs = [(seed, by_seed[seed][1], base[seed][1]) for seed in seeds]
        for b in _scores(pairs[0][2], mode):
            out.append(f"| {_row_label(preset, div, variant)} | {b} | " + _seed_cells(pairs, mode, b))
    return _seed_section(
        f"## The paper's KD+SRD minus each other row, {mode}, over training seeds",
        "Positive: the paper's KD+SRD scored higher than the row (a control or another selection) on the same "
        "examples. " + SEEDS_LEGEND,
        "KD+SRD minus the row, per seed | mean (sd over seeds) | seeds with KD+SRD above",
        out,
    )


def trained_rows_table(
    finished: dict[tuple[str, str], dict[int, tuple[Path, Path]]], preset: dict[str, Any]
) -> list[str]:
    """Markdown: what each row's selection kept, by reference length (tokens, EOS included, from
    the reflection manifest of its first seed): all rows, the kept and the dropped ones, and each
    curriculum slice; rows with no reflection (KD, the controls) train on all of them."""
    out = []
    for (div, variant), by_seed in finished.items():
        seed = sorted(by_seed)[0]
        path = by_seed[seed][1] / "reflection" / "manifest.jsonl"
        if not path.exists():
            continue
        manifest = [json.loads(line) for line in path.read_text().splitlines()]

        def mean_tokens(rows: list[dict[str, Any]]) -> str:
            return f"{statistics.fmean(r['stats']['ref_tokens'] for r in rows):.1f} ({len(rows)})" if rows else "-"

        kept = [r for r in manifest if r["kept"]]
        slices = sorted({r["stage"] for r in kept})
        out.append(
            f"| {_row_label(preset, div, variant)} | {seed} | {mean_tokens(manifest)} | {mean_tokens(kept)} | "
            f"{mean_tokens([r for r in manifest if not r['kept']])} | "
            + " / ".join(mean_tokens([r for r in kept if r["stage"] == x]) for x in slices)
            + f" | {_as_trained(by_seed[seed][1], manifest)} |"
        )
    if not out:
        return []
    return [
        "## What the selection kept: mean reference tokens (rows)",
        "",
        "From each row's reflection manifest (its first training seed). KD and the temperature controls train on "
        "all rows, each for the same epochs: their training data is the `all rows` column. Baby Step trains stage i "
        "on slices 1..i, so the first slice is seen in every stage: `as trained` weights each row by the epochs it "
        "was trained for (from each stage's examples.json), the reference length the student learned from.",
        "",
        "| row | seed | all rows | kept | dropped | slices 1 / 2 / 3 | as trained |",
        "|---|---|---|---|---|---|---|",
        *out,
        "",
    ]


def _as_trained(run: Path, manifest: list[dict[str, Any]]) -> str:
    """Mean reference tokens over the rows a run trained on, each weighted by its epochs (the sum over
    the stages that trained it), from results.json and each stage's examples.json; `-` if unknown."""
    tokens = {r["id"]: r["stats"]["ref_tokens"] for r in manifest}
    results = run / "results.json"
    if not results.exists():
        return "-"
    weight: dict[str, float] = {}
    for stage in json.loads(results.read_text()).get("stages", []):
        ids = run / "stages" / stage["stage"] / "examples.json"
        if not ids.exists():
            return "-"
        for i in json.loads(ids.read_text())["ids"]:
            weight[i] = weight.get(i, 0.0) + float(stage["epochs"])
    total = sum(w for i, w in weight.items() if i in tokens)
    if not total:
        return "-"
    return f"{sum(tokens[i] * w for i, w in weight.items() if i in tokens) / total:.1f}"


def benchmark_examples(first: Path) -> dict[str, list[Any]]:
    """Benchmark name -> its evaluated rows, from the first run's saved config (data folder, limit)."""
    from srd.config import load_config
    from srd.data.sources import load_examples
    from srd.eval.benchmarks import resolve_benchmark

    cfg_path = first / "config.yaml"
    if not cfg_path.exists():
        return {}
    cfg = load_config(cfg_path)
    out = {}
    for spec in cfg.eval.benchmarks:
        bench = resolve_benchmark(spec)
        out[bench.name] = load_examples(bench.data, data_dir=cfg.data.data_dir, limit=cfg.eval.limit)
    return out


def seed_sections(
    finished: dict[tuple[str, str], dict[int, tuple[Path, Path]]], modes: list[str], preset: dict[str, Any], first: Path
) -> list[str]:
    """The record's sections over training seeds: the seed table, answer lengths of every model,
    and each benchmark split by reference length and topic (KD against every row, seeds pooled)."""
    from srd.report import breakdown_table, length_table

    examples = benchmark_examples(first)
    lines: list[str] = []
    for m in modes:
        lines += seed_table(finished, m, preset)
    for m in modes:
        lines += versus_table(finished, m, preset)
    lines += trained_rows_table(finished, preset)
    if not examples:
        return lines
    refs_all = [("teacher", "teacher"), ("initial", "student before KD")]
    for div in dict.fromkeys(d for d, _ in finished):
        rows = {v: by_seed for (d, v), by_seed in finished.items() if d == div}
        seeds = sorted(next(iter(rows.values())))
        for m in modes:
            # every row of a seed compares with that seed's KD: the KD models of the rows' seeds
            kd = list(dict.fromkeys(by_seed[s][0] / "eval" / m for by_seed in rows.values() for s in sorted(by_seed)))
            models = [
                (_row_label(preset, div, v), [by_seed[s][1] / "eval" / m for s in sorted(by_seed)])
                for v, by_seed in rows.items()
            ]
            refs = [
                (label, [first / "references" / ref / "eval" / m])
                for ref, label in refs_all
                if _scores(first / "references" / ref, m)
            ]
            lines += [
                f"## Answer lengths, {m} ({div}; words; training seeds {', '.join(map(str, seeds))} pooled)",
                "",
                *length_table([*refs, (f"KD ({div})", kd), *models], examples),
                "",
            ]
            for b, rows_b in examples.items():
                table = breakdown_table((f"KD ({div})", kd), models, b, rows_b)
                if table:
                    lines += [
                        f"## {b}, {m}, by reference length and topic ({div}; minus KD, training seeds pooled)",
                        "",
                        *table,
                        "",
                    ]
    return lines


def _score_table(mode: str, rows: list[tuple[str, dict[str, Any]]], preset: dict[str, Any]) -> list[str]:
    if not rows:
        return []
    benches = list(dict.fromkeys(b for _, s in rows for b in s))
    how = "greedy" if mode == "greedy" else f"sampled at T = 1, seeds {preset.get('sampled_seeds') or 'of eval.seeds'}"
    out = [
        f"## Scores ({how}, x100; n = rows per benchmark)",
        "",
        "| model | " + " | ".join(f"{b} (n = {rows[0][1].get(b, {}).get('n', '?')})" for b in benches) + " | average |",
        "|---|" + "---|" * (len(benches) + 1),
    ]
    for label, s in rows:
        vals = [s.get(b, {}).get("mean") for b in benches]
        avg = statistics.fmean(vals) if all(v is not None for v in vals) else float("nan")
        out.append(f"| {label} | " + " | ".join("-" if v is None else f"{v:.2f}" for v in vals) + f" | {avg:.2f} |")
    return out + [""]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default: the preset's)")
    p.add_argument("--divergences", nargs="+", default=None, help="e.g. fkl rkl (default: the preset's)")
    p.add_argument("--random-init", action="store_true", help="random-init GPT-2 1.5B -> 124M shapes (timing)")
    p.add_argument("--out", default=None, help="folder for the runs (default runs/quality-<preset>)")
    p.add_argument(
        "--record", default=None, help="markdown record (default benchmarks/results/DATE-<preset>-quality.md)"
    )
    p.add_argument("--report-only", action="store_true", help="only (re)write the record from finished runs")
    p.add_argument("--dry-run", action="store_true", help="print each run's `srd run` command and stop")
    p.add_argument(
        "--plan", action="store_true", help="print each run's stages, optimizer steps and dev evaluations, and stop"
    )
    p.add_argument("--no-progress", action="store_true")
    p.add_argument(
        "--references",
        nargs="*",
        default=["teacher", "initial"],
        help="reference models evaluated once, in the first run: teacher, initial, or none when given bare "
        "(default: the teacher and the student before KD)",
    )
    p.add_argument(
        "--variants",
        default=None,
        type=lambda v: [x for x in v.split(",") if x],
        help="comma-separated variant runs to add to the preset's base run (default: all; `none`: the base only)",
    )
    p.add_argument("--note", action="append", default=[], help="a paragraph for the record's Notes section")
    p.add_argument("overrides", nargs="*", help="extra key=value overrides for every run (e.g. data.train_limit=200)")
    args = p.parse_args(argv)
    # a bare --references swallows the key=value overrides after it: they are overrides, not models
    args.overrides += [r for r in args.references if "=" in r]
    args.references = [r for r in args.references if "=" not in r]
    bad = sorted(set(args.references) - {"teacher", "initial"})
    if bad:
        p.error(f"--references {' '.join(bad)}: choose from teacher, initial (or give --references bare for none)")

    preset = dict(PRESETS[args.preset])
    if args.random_init:
        preset["overrides"] = {**preset["overrides"], **RANDOM_INIT}
    seeds = args.seeds or preset["seeds"]
    divergences = args.divergences or preset["divergences"]
    suffix = "-random" if args.random_init else ""
    out = Path(args.out or f"runs/quality-{args.preset}{suffix}")
    variants = list(preset.get("variants", {}))
    if args.variants is not None:
        unknown = sorted(set(args.variants) - set(variants) - {"none"})
        if unknown:
            p.error(f"--variants {' '.join(unknown)}: preset {args.preset} has {[v for v in variants if v] or 'none'}")
        variants = [v for v in variants if not v or v in args.variants]
    runs = run_names(args.preset + suffix, divergences, seeds, variants if len(variants) > 1 else None)
    # references_last: the teacher and the initial student are evaluated after every trained
    # model (quality.py's last phase), so the comparisons come first in a long preset
    references = () if preset.get("references_last") else tuple(args.references)
    commands = [
        (name, overrides_for(preset, div, seed, name, out, i == 0, args.overrides, variant, references))
        for i, (name, div, seed, variant) in enumerate(runs)
    ]
    if args.plan:
        print("\n".join(plan_table(commands)))
        return 0
    if args.dry_run:
        for _, o in commands:
            print("srd run - " + " ".join(f"'{x}'" for x in o))
        return 0
    student = [x.split("=", 1)[1] for x in commands[0][1] if x.startswith("model.student=")][-1]
    prepare = preset.get(
        "prepare", f"srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 --out {HEALED_STUDENT}"
    )
    if not args.report_only and student in (HEALED_STUDENT, GSM8K_STUDENT) and not Path(student).exists():
        print(
            f"error: the student {student} does not exist; make it first (one time, cached):\n  {prepare}",
            file=sys.stderr,
        )
        return 2
    t0 = time.perf_counter()
    if not args.report_only:
        import torch

        from srd.config import load_config
        from srd.models.load import native_bf16
        from srd.recipes.experiment import run_experiment
        from srd.utils import tune_cpu_allocator

        if not torch.cuda.is_available():  # as the srd CLI does (SRD_CPU_MALLOC=0: glibc's default)
            tune_cpu_allocator()
            notice = bf16_notice(load_config(None, commands[0][1]), native_bf16("cpu"))
            if notice:
                print(notice, file=sys.stderr, flush=True)
        for name, o in commands:
            if _side(out / name) and load_config(None, o).compare.baseline:
                print(
                    f"error: {out / name} holds a KD half trained apart ({SIDE_FILE}, from quality_baseline.py): "
                    "add compare.baseline=false to train only the SRD half there",
                    file=sys.stderr,
                )
                return 2
        claim_out(out, "quality benchmark", own=("dev-rows",))  # only into a folder of its own (dev_choice.py's cache)
        log_machine(out)  # the record, even one rewritten elsewhere, names the machines of its runs

        progress = not args.no_progress
        for (name, o), (_, _, _, variant) in zip(commands, runs):
            print(f"== {name} ==", flush=True)
            if variant and variant not in preset.get("own_reflection", []):
                share_reflection(out / name.removesuffix(f"-{variant}"), out / name)
            result = run_experiment(load_config(None, o), progress=progress)
            if not result.get("complete"):
                print(f"{name} paused; rerun the same command to resume", file=sys.stderr)
                return 1
            if preset.get("sampled_seeds"):
                models = json.loads((out / name / "experiment.json").read_text())["models"]
                trained = {m: models[m] for m in ("baseline", "final") if models.get(m)}
                evaluate_models(o, trained, preset["sampled_seeds"], progress)
        if preset.get("references_last") and args.references:
            cfg = load_config(None, commands[0][1])
            refs = {"teacher": cfg.model.teacher, "initial": cfg.model.student}
            refs = {m: refs[m] for m in args.references if refs[m]}
            print("== references ==", flush=True)
            evaluate_models(commands[0][1], refs, None, progress)
            if preset.get("sampled_seeds"):
                evaluate_models(commands[0][1], refs, preset["sampled_seeds"], progress)
    if args.report_only:  # every row is labelled by this command's settings: they must be the runs' own
        from srd.config import load_config
        from srd.recipes.train import config_differences

        for name, o in commands:
            saved = out / name / "config.yaml"
            # the dev schedule too (a resume may change it; the record's rows assume one schedule)
            diffs = (
                config_differences(saved, load_config(None, o), also=("train.eval_every",)) if saved.exists() else []
            )
            if diffs:
                print(
                    f"error: {out / name} was trained with another config than this command gives it "
                    f"({'; '.join(diffs[:4])}): rewrite the record with the preset, --variants and overrides "
                    "that made the runs",
                    file=sys.stderr,
                )
                return 2
            side = _side(out / name)
            if side and _without_compare(load_config(None, side["overrides"])) != _without_compare(
                load_config(None, o)
            ):
                print(
                    f"error: the KD half in {out / name} ({SIDE_FILE}) was trained with other overrides than this "
                    "command gives its run: rewrite the record with the quality_baseline.py command's overrides "
                    "(and compare.baseline=false)",
                    file=sys.stderr,
                )
                return 2
    text = write_record(args, runs, out, None if args.report_only else time.perf_counter() - t0)
    save_record(text, args.record, args.preset + suffix, "quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
