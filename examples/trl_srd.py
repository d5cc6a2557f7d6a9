"""SRD inside TRL's GKDTrainer: the bundled SmolLM2-135M-Instruct teacher distilled into the
healed 20-layer student on a Dolly slice, with srd's reflection choosing and ordering the data
and each curriculum stage's temperature and CE weight reaching GKD's loss.

    make setup && .venv/bin/srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 \
        --out runs/students/smollm2-20l-healed      # once; `make demo` builds it too
    .venv/bin/python examples/trl_srd.py [ROWS]     # 48 rows: 18 optimizer steps; rerun to resume

Everything a TRL user adds to a GKDTrainer script is marked `# SRD`. Other models, data and
output folder: `--teacher`, `--student`, `--data` (a named set or a JSONL file), `--out` (the
test suite runs it so on tiny models). SRD's own settings are an `SRDConfig`, read from the same
command line as TRL scripts read theirs (`--srd_keep_ratio 0.5 --srd_epochs_per_stage 4`, ...;
`--help` lists them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from datasets import Dataset
from transformers import HfArgumentParser
from transformers.trainer_utils import get_last_checkpoint
from trl.experimental.gkd import GKDConfig

from srd.data import load_examples
from srd.integrations.hf import SRDConfig, prepare_curriculum  # SRD
from srd.integrations.trl import SRDGKDTrainer  # SRD
from srd.models import load_model, load_tokenizer
from srd.models.load import native_bf16


def _options() -> tuple[argparse.Namespace, SRDConfig]:
    p = argparse.ArgumentParser(description="SRD inside TRL's GKDTrainer", add_help=False)
    p.add_argument("rows", nargs="?", type=int, default=48, help="training rows (default 48)")
    p.add_argument("--teacher", default="smollm2-135m-instruct")
    p.add_argument("--student", default="runs/students/smollm2-20l-healed")
    p.add_argument("--data", default="dolly", help="a named set or a JSONL file (instruction / input / output)")
    p.add_argument("--out", default="runs/trl-srd")
    opt, rest = p.parse_known_args()
    # SRD: its settings as TRL's are set (HfArgumentParser / TrlParser); this example's defaults:
    # 2 epochs per stage and answers of up to 96 tokens, to run in minutes on a CPU
    srd_parser = HfArgumentParser(SRDConfig, parents=[p])
    srd_parser.set_defaults(srd_epochs_per_stage=2.0, srd_max_new_tokens=96)
    srd, *_ = srd_parser.parse_args_into_dataclasses(rest, look_for_args_file=False)  # the rest: the options above
    if srd.srd_reflection_dir == SRDConfig.srd_reflection_dir:
        srd.srd_reflection_dir = str(Path(opt.out) / "reflection")
    return opt, srd


def dolly_conversations(n: int, data: str = "dolly") -> Dataset:
    """The first n training rows as conversations (the format GKDTrainer's collator takes)."""
    rows = []
    for ex in load_examples(data, limit=n):
        user = f"{ex.instruction}\n\n{ex.input}" if ex.input else ex.instruction
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": ex.target}]})
    return Dataset.from_list(rows)


def main() -> None:
    opt, srd = _options()
    out = Path(opt.out)
    tokenizer = load_tokenizer(opt.student)
    student = load_model(opt.student)
    teacher = load_model(opt.teacher)
    train = dolly_conversations(opt.rows, opt.data)
    args = GKDConfig(
        output_dir=str(out / "gkd"),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        learning_rate=1e-4,
        lmbda=0.0,  # off-policy batches (on-policy sampling is slow on a CPU; 0.5 is GKD's default)
        beta=0.0,  # forward KL(teacher || student)
        max_length=384,
        num_train_epochs=1,  # SRD: the curriculum holds every stage's epochs
        train_sampling_strategy="sequential",  # SRD: read the rows in the curriculum's order
        logging_steps=2,
        save_steps=6,
        report_to=[],
        use_cpu=True,
        bf16=native_bf16("cpu"),  # bf16 autocast where the CPU has native bf16 (AMX / AVX512-BF16)
    )
    # SRD: the student answers every prompt; ROUGE-L + CE, reciprocal rank fusion, the easiest 75%
    # kept in 3 stages (resumable in the reflection folder); then the Baby Step order (stage i =
    # stages 1..i, 2 epochs each), tau 1 -> 2, alpha 0.3 -> 0.1, planned for the rows an optimizer
    # step of these arguments consumes (batch x accumulation x processes) and their seed
    rows, curriculum = prepare_curriculum(train, args=args, student=student, tokenizer=tokenizer, srd=srd)
    trainer = SRDGKDTrainer(
        model=student,
        teacher_model=teacher,
        args=args,
        train_dataset=rows,  # SRD: the rows in the curriculum's order
        processing_class=tokenizer,
    )
    curriculum.attach(trainer)  # SRD: tau / alpha per stage, logged as srd_stage, srd_tau, srd_alpha
    last = get_last_checkpoint(args.output_dir) if Path(args.output_dir).exists() else None
    trainer.train(resume_from_checkpoint=last)
    trainer.save_model(str(out / "final"))
    print(f"stages of {curriculum.stage_steps} optimizer steps; the student is in {out / 'final'}")


if __name__ == "__main__":
    main()
