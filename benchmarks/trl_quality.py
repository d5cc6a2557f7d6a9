"""TRL's GKDTrainer alone against TRL with srd's selection and curriculum, at the same budget ratio.

    python benchmarks/trl_quality.py                       # bundled teacher -> healed 20-layer student
    python benchmarks/trl_quality.py --rows 200 --epochs-per-stage 8 --limit 242
    python benchmarks/trl_quality.py --report-only         # rewrite the record from finished runs

Both arms train the same student from the same teacher with TRL's trainer, the same optimizer
settings and the same data collation (srd's tokenisation of prompt/completion rows; both read
the rows TRL's way otherwise), off-policy (lmbda 0) forward KL (beta 0):

  trl      `GKDTrainer` on all the rows, shuffled, for 2.5 x epochs-per-stage epochs (the KD
           baseline's budget: SRD's sample passes are 60% of it);
  trl+srd  `reflect_dataset` (the student answers every prompt; ROUGE-L + CE fused; the easiest
           75% kept in 3 stages), then `SRDGKDTrainer` on the Baby-Step order, epochs-per-stage
           per stage, tau 1 -> 2 and alpha 0.3 -> 0.1 reaching the loss.

For reference, srd's own loop at the same settings (`srd run`: the same rows and prompts, reflection,
stages, epochs, batch, learning rate and forward KL from the full teacher, every step's
teacher forward included as in TRL; its KD baseline with no CE term, like GKDTrainer) gives two
more rows, srd KD and srd KD+SRD (`--no-srd-loop` skips them). What differs from TRL's arms:
srd's loop restarts a cosine schedule in each stage and decays weights by 0.01, where TRL decays
the rate linearly over the whole run without weight decay.

Each final model is evaluated greedily on DollyEval and SelfInst (`--limit` rows); the record
gives scores, the difference with its 95% bootstrap interval and Wilcoxon p, and the wall time
of each arm (reflection included for the SRD arms). Every phase is resumable: finished models
and evaluations are reused, and training continues from the last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import claim_out, header, log_machine, save_record  # noqa: E402

HEALED_STUDENT = "runs/students/smollm2-20l-healed"


def _rows(spec: str, n: int, data_dir: str | None) -> Any:
    from datasets import Dataset

    from srd.data import load_examples
    from srd.data.prompts import render_prompt

    examples = load_examples(spec, data_dir=data_dir, limit=n)
    return Dataset.from_dict(
        {
            "prompt": [render_prompt(e.instruction, e.input, "alpaca") for e in examples],
            "completion": [e.target for e in examples],
        }
    )


def _train(args: argparse.Namespace, arm: str, out: Path, tok: Any, ds: Any, curriculum: Any) -> float:
    """Train one arm into out/<arm>/final; returns its training seconds (summed over invocations)."""
    from transformers.trainer_utils import get_last_checkpoint
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from srd.data.tokenize import collate, encode_example
    from srd.integrations.hf import examples_from_dataset
    from srd.integrations.trl import SRDGKDTrainer
    from srd.models import load_model

    folder = out / arm
    timing = folder / "train_s.json"
    if (folder / "final" / "config.json").exists():
        return json.loads(timing.read_text())["seconds"]
    encoded = [
        encode_example(tok, ex, fmt="plain", max_prompt_len=_prompt_len(args), max_len=args.max_len)
        for ex in examples_from_dataset(ds)
    ]
    rows = ds.add_column("row", list(range(len(ds))))
    epochs = 1 if curriculum else 2.5 * args.epochs_per_stage
    config = GKDConfig(
        output_dir=str(folder / "trainer"),
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr,
        num_train_epochs=epochs,
        lmbda=0.0,
        beta=0.0,
        train_sampling_strategy="sequential" if curriculum else "random",
        remove_unused_columns=False,
        save_steps=args.save_steps,
        logging_steps=5,
        report_to=[],
        use_cpu=not _cuda(),
        bf16=_precision() == "bf16",
        seed=args.seed,
        disable_tqdm=args.no_progress,
    )
    cls = SRDGKDTrainer if curriculum else GKDTrainer
    trainer = cls(
        model=load_model(args.student),
        teacher_model=load_model(args.teacher),
        args=config,
        train_dataset=curriculum.dataset(rows) if curriculum else rows,
        data_collator=lambda feats: collate([encoded[f["row"]] for f in feats], tok.pad_token_id),
        processing_class=tok,
    )
    if curriculum:
        curriculum.attach(trainer)
    previous = json.loads(timing.read_text())["seconds"] if timing.exists() else 0.0
    last = get_last_checkpoint(config.output_dir) if Path(config.output_dir).exists() else None
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=last)
    seconds = previous + time.perf_counter() - t0
    from srd.utils import atomic_write_json

    trainer.save_model(str(folder / "final"))
    tok.save_pretrained(str(folder / "final"))
    atomic_write_json(timing, {"seconds": round(seconds, 3)})
    return seconds


def _prompt_len(args: argparse.Namespace) -> int:
    """Prompt tokens kept: half of max_len, at most 256 (192 of the default 384)."""
    return min(256, args.max_len // 2)


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _precision() -> str:
    """One precision for the whole process (accelerate keeps one state per process): bf16 where
    it runs in hardware (srd's train.precision=auto rule, SRD_CPU_BF16=0 turns it off), else fp32."""
    from srd.runtime import auto_bf16

    return "bf16" if auto_bf16(_cuda()) else "fp32"


def _evaluate(args: argparse.Namespace, model_dir: Path) -> None:
    from srd.eval.evaluate import evaluate
    from srd.models import load_model, load_tokenizer
    from srd.runtime import make_accelerator

    evaluate(
        load_model(str(model_dir)).eval(),
        load_tokenizer(str(model_dir)),
        args.benchmarks,
        model_dir.parent / "eval" / "greedy",
        seeds=None,
        limit=args.limit,
        data_dir=args.data_dir,
        max_new_tokens=args.max_new_tokens,
        batch_size=16,
        accelerator=make_accelerator(_precision()),
        progress=not args.no_progress,
        model_name=str(model_dir),
    )


def srd_loop_config(args: argparse.Namespace, out: Path) -> Any:
    """srd's own `srd run` at the TRL arms' settings (final weights evaluated, no dev evaluation)."""
    from srd.config import load_config

    overrides = [
        "name=srd-loop", f"output_dir={out}", "method=srd", f"seed={args.seed}",
        f"model.teacher={args.teacher}", f"model.student={args.student}",
        f"data.train={args.data}", f"data.data_dir={args.data_dir or 'null'}", f"data.train_limit={args.rows}",
        "data.prompt_format=alpaca", f"data.max_prompt_len={_prompt_len(args)}", f"data.max_len={args.max_len}",
        "loss.divergence=fkl", "loss.alpha=0.0", "loss.tau=1.0", "loss.teacher_top_k=0",
        f"curriculum.epochs_per_stage={args.epochs_per_stage}", "compare.baseline=true", "compare.step_ratio=0.6",
        f"train.batch_size={args.batch_size}", f"train.grad_accum={args.grad_accum}", f"train.lr={args.lr}",
        "train.eval_every=0", f"train.save_every={args.save_steps}", "train.keep_last=1",
        f"train.precision={_precision()}", "dev_eval.num_examples=0",
        f"eval.benchmarks=[{','.join(args.benchmarks)}]", "eval.models=[baseline,final]", "eval.checkpoint=final",
        f"eval.limit={args.limit}", "eval.greedy=true", f"eval.max_new_tokens={args.max_new_tokens}",
        "eval.batch_size=16", *args.reflect_overrides,
    ]  # fmt: skip
    return load_config(None, overrides)


def _srd_loop(args: argparse.Namespace, out: Path) -> None:
    from srd.recipes.experiment import run_experiment

    run_experiment(srd_loop_config(args, out), progress=not args.no_progress)


WITHOUT_SRD = {"trl+srd": "trl", "srd KD+SRD": "srd KD"}  # each SRD arm and the same loop without SRD


def _arms(out: Path) -> list[tuple[str, Path, float | None, float]]:
    """(name, evaluation folder, training seconds or None, reflection seconds) of every arm."""
    reflection = out / "reflection" / "summary.json"
    reflect_s = json.loads(reflection.read_text())["wall_time_s"] if reflection.exists() else 0.0
    arms = []
    for arm in ("trl", "trl+srd"):
        timing = out / arm / "train_s.json"
        seconds = json.loads(timing.read_text())["seconds"] if timing.exists() else None
        arms.append((arm, out / arm / "eval" / "greedy", seconds, reflect_s if arm == "trl+srd" else 0.0))
    loop = out / "srd-loop"
    experiment = loop / "experiment.json"
    timing = json.loads(experiment.read_text())["timing"] if experiment.exists() else {}
    if loop.exists():
        arms.append(("srd KD", loop / "baseline" / "eval" / "greedy", timing.get("baseline_train_s"), 0.0))
        arms.append(("srd KD+SRD", loop / "eval" / "greedy", timing.get("train_s"), timing.get("reflection_s", 0.0)))
    return arms


def stage_agreement(out: Path) -> str | None:
    """Whether srd's loop selected what reflect_dataset selected: each example's stage (0 =
    dropped), compared row by row (both manifests list the rows in their input order; their ids
    differ, a row index against a Dolly id)."""
    a, b = out / "reflection" / "manifest.jsonl", out / "srd-loop" / "reflection" / "manifest.jsonl"
    if not (a.exists() and b.exists()):
        return None
    stages = [[json.loads(line)["stage"] or 0 for line in f.read_text().splitlines()] for f in (a, b)]
    same = sum(x == y for x, y in zip(*stages, strict=True))
    return (
        f"srd's loop put {same} of {len(stages[0])} rows in the stage that reflect_dataset put them in (0 = dropped)."
    )


def write_record(args: argparse.Namespace, out: Path) -> str:
    from srd.eval.evaluate import load_example_scores
    from srd.report import difference_cell, paired_difference

    lines = header(
        "TRL's GKDTrainer alone against TRL + srd's selection and curriculum", runs=out, wrote_only=args.report_only
    )
    lines += [
        f"Rows: {args.rows} of `{args.data}`; {args.epochs_per_stage} epochs per SRD stage against "
        f"{2.5 * args.epochs_per_stage:g} epochs for TRL alone; batch {args.batch_size} x {args.grad_accum}; "
        f"lr {args.lr}; greedy evaluation, {args.max_new_tokens} new tokens, first {args.limit} rows.",
        "",
        "| arm | "
        + " | ".join(Path(b).stem if Path(b).suffix else b for b in args.benchmarks)
        + " | training (s) | reflection (s) | total (s) | total vs the same loop without SRD |",
        "|---|" + "---|" * (len(args.benchmarks) + 4),
    ]
    diffs = []
    arms = {name: (folder, train_s, reflect_s) for name, folder, train_s, reflect_s in _arms(out)}
    evaluated: dict[str, list[str]] = {}  # arm -> its benchmarks, once trained and evaluated
    for arm, (folder, train_s, reflect_s) in arms.items():
        if not (folder / "summary.json").exists() or train_s is None:
            lines.append(f"| {arm} | not finished |" + " |" * (len(args.benchmarks) + 3))
            continue
        bench = json.loads((folder / "summary.json").read_text())["benchmarks"]
        evaluated[arm] = list(bench)
        cells = [f"{bench[b]['mean']:.2f}" for b in bench]
        other = arms.get(WITHOUT_SRD.get(arm, ""))
        ratio = f"{100 * (train_s + reflect_s) / (other[1] + other[2]):.0f}%" if other and other[1] else "-"
        cells += [f"{train_s:.0f}", f"{reflect_s:.0f}", f"{train_s + reflect_s:.0f}", ratio]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    for srd_arm, kd_arm in WITHOUT_SRD.items():
        if srd_arm not in evaluated or kd_arm not in evaluated:
            continue
        a, c = arms[kd_arm][0], arms[srd_arm][0]
        for b in evaluated[srd_arm]:
            cell = difference_cell(paired_difference(load_example_scores(a, b), load_example_scores(c, b)))
            diffs.append(f"| {srd_arm} minus {kd_arm} | {b} | {cell} |")
    agreement = stage_agreement(out)
    if agreement:
        lines += ["", agreement]
    if diffs:
        lines += [
            "",
            "With SRD minus without, each in its own loop (mean [95% bootstrap interval], Wilcoxon p):",
            "",
            "| arms | benchmark | difference |",
            "|---|---|---|",
            *diffs,
        ]
    for note in args.note or []:
        lines += ["", note]
    return "\n".join(lines) + "\n"


# what the arms' weights depend on: a folder's arms were all trained with one set of these
TRAINING_ARGS = (
    "teacher", "student", "data", "data_dir", "rows", "epochs_per_stage", "batch_size", "grad_accum", "lr",
    "max_len", "seed", "reflect_overrides",
)  # fmt: skip
SETTINGS = "settings.json"


def check_settings(args: argparse.Namespace, out: Path) -> None:
    """The arms in `out` are reused and resumed as they are, and the record labels them with this
    command's arguments: refuse (SystemExit) a folder whose arms were trained with other ones
    (recorded in out/settings.json at the first start), naming them; a new folder records them."""
    from srd.utils import atomic_write_json, read_json

    now = {k: getattr(args, k) for k in TRAINING_ARGS}
    path = out / SETTINGS
    if path.exists():
        before = read_json(path)
        changed = [f"--{k.replace('_', '-')} {before.get(k)!r}, now {now[k]!r}" for k in now if before.get(k) != now[k]]
        if changed:
            raise SystemExit(
                f"error: {out} holds arms trained with other arguments ({'; '.join(changed)}): rerun with those, "
                "or choose another --out"
            )
    elif not args.report_only:
        atomic_write_json(path, now)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student", default=HEALED_STUDENT)
    p.add_argument("--data", default="dolly", help="training rows (an srd data spec)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--rows", type=int, default=200)
    p.add_argument("--epochs-per-stage", type=float, default=2.0)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--max-len", type=int, default=384)
    p.add_argument("--save-steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--benchmarks", nargs="+", default=["dolly-eval", "self-inst"])
    p.add_argument("--limit", type=int, default=100, help="evaluation rows per benchmark")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--reflect-overrides", nargs="*", default=["generation.max_new_tokens=128"])
    p.add_argument("--no-srd-loop", action="store_true", help="skip the reference rows of srd's own loop")
    p.add_argument("--out", default="runs/trl-quality")
    p.add_argument("--record", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--note", action="append", help="a paragraph for the record (repeatable)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
        claim_out(out, "trl-quality benchmark", own=("trl", "trl+srd", SETTINGS))  # only into a folder of its own
    check_settings(args, out)
    if not args.report_only:
        log_machine(out)  # the record, even one rewritten elsewhere, names the machines of its runs
        from srd.config import CurriculumConfig
        from srd.integrations.hf import Curriculum, reflect_dataset
        from srd.models import load_model, load_tokenizer

        tok = load_tokenizer(args.student)
        ds = _rows(args.data, args.rows, args.data_dir)
        reflected = reflect_dataset(
            ds,
            student=load_model(args.student),
            tokenizer=tok,
            out_dir=out / "reflection",
            overrides=[
                *args.reflect_overrides,
                # the lengths the arms train with (srd's defaults are 256 / 512)
                f"data.max_prompt_len={_prompt_len(args)}",
                f"data.max_len={args.max_len}",
                f"data.data_dir={args.data_dir or 'null'}",
                f"train.precision={_precision()}",
            ],
            progress=not args.no_progress,
        )
        curriculum = Curriculum.from_reflected(
            reflected,
            batch_size=args.batch_size * args.grad_accum,
            curriculum=CurriculumConfig(epochs_per_stage=args.epochs_per_stage, lr_schedule="global"),
            seed=args.seed,
        )
        for arm, cur in (("trl", None), ("trl+srd", curriculum)):
            print(f"== {arm} ==", flush=True)
            _train(args, arm, out, tok, reflected if cur else ds, cur)
            _evaluate(args, out / arm / "final")
        if not args.no_srd_loop:
            print("== srd's own loop ==", flush=True)
            _srd_loop(args, out)
    record = args.record or str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-trl-quality.md")
    save_record(write_record(args, out), record, "trl", "quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
