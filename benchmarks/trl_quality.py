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

Each final model is evaluated greedily on DollyEval and SelfInst (`--limit` rows); the record
gives scores, the difference with its 95% bootstrap interval and Wilcoxon p, and the wall time
of each arm (reflection included for trl+srd). Every phase is resumable: finished models and
evaluations are reused, and training continues from the trainer's last checkpoint.
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

from benchmarks.common import header, save_record  # noqa: E402

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
        encode_example(tok, ex, fmt="plain", max_prompt_len=256, max_len=args.max_len)
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


def write_record(args: argparse.Namespace, out: Path) -> str:
    from srd.eval.evaluate import load_example_scores
    from srd.report import difference_cell, paired_difference

    lines = header("TRL's GKDTrainer alone against TRL + srd's selection and curriculum")
    lines += [
        f"Rows: {args.rows} of `{args.data}`; {args.epochs_per_stage} epochs per SRD stage against "
        f"{2.5 * args.epochs_per_stage:g} epochs for TRL alone; batch {args.batch_size} x {args.grad_accum}; "
        f"lr {args.lr}; greedy evaluation, {args.max_new_tokens} new tokens, first {args.limit} rows.",
        "",
        "| arm | " + " | ".join(Path(b).stem if Path(b).suffix else b for b in args.benchmarks) + " | wall time (s) |",
        "|---|" + "---|" * (len(args.benchmarks) + 1),
    ]
    diffs = []
    for arm in ("trl", "trl+srd"):
        summary_path = out / arm / "eval" / "greedy" / "summary.json"
        if not summary_path.exists():
            lines.append(f"| {arm} | not finished |" + " |" * len(args.benchmarks))
            continue
        bench = json.loads(summary_path.read_text())["benchmarks"]
        t = json.loads((out / arm / "train_s.json").read_text())["seconds"]
        reflection = json.loads((out / "reflection" / "summary.json").read_text())["wall_time_s"] if arm != "trl" else 0
        cells = [f"{bench[b]['mean']:.2f}" for b in bench]
        lines.append(f"| {arm} | " + " | ".join(cells) + f" | {t + reflection:.0f} |")
        if arm == "trl+srd" and (out / "trl" / "eval" / "greedy" / "summary.json").exists():
            for b in bench:
                a = load_example_scores(out / "trl" / "eval" / "greedy", b)
                c = load_example_scores(out / arm / "eval" / "greedy", b)
                diffs.append(f"| {b} | {difference_cell(paired_difference(a, c))} |")
    if diffs:
        lines += [
            "",
            "TRL + SRD minus TRL alone (mean [95% bootstrap interval], Wilcoxon p):",
            "",
            "| benchmark | difference |",
            "|---|---|",
            *diffs,
        ]
    return "\n".join(lines) + "\n"


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
    p.add_argument("--out", default="runs/trl-quality")
    p.add_argument("--record", default=None)
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    out = Path(args.out)
    if not args.report_only:
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
                f"data.data_dir={args.data_dir or 'null'}",
                f"train.precision={_precision()}",
            ],
            progress=not args.no_progress,
        )
        curriculum = Curriculum.from_reflected(
            reflected,
            batch_size=args.batch_size * args.grad_accum,
            curriculum=CurriculumConfig(epochs_per_stage=args.epochs_per_stage),
            seed=args.seed,
        )
        for arm, cur in (("trl", None), ("trl+srd", curriculum)):
            print(f"== {arm} ==", flush=True)
            _train(args, arm, out, tok, reflected if cur else ds, cur)
            _evaluate(args, out / arm / "final")
    record = args.record or str(ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-trl-quality.md")
    save_record(write_record(args, out), record, "trl", "quality")
    return 0


if __name__ == "__main__":
    sys.exit(main())
