"""Run by tests/test_integrations.py under torchrun with 2 CPU processes (gloo): a plan made for
one process is refused, a plan made from the trainer's arguments trains every step of every
stage. Each process writes its result to <out>/result-rank<R>.json (two processes printing to one
pipe can interleave their lines)."""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from transformers import Trainer, TrainingArguments

from srd.config import CurriculumConfig
from srd.integrations.hf import Curriculum
from srd.models import load_model, load_tokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository, for the tests' helpers
from tests.test_integrations import _sequential_args  # noqa: E402

student, out = sys.argv[1], Path(sys.argv[2])
tok = load_tokenizer(student)
n = 24
stages = np.array([1] * 8 + [2] * 8 + [3] * 8)
rows = Dataset.from_dict({"row": list(range(n)), "srd_stage": stages.tolist(), "srd_position": list(range(1, n + 1))})
ids = [tok(f"row {i} says hello", return_tensors=None)["input_ids"] for i in range(n)]


def collator(features):
    batch = [torch.tensor(ids[f["row"]]) for f in features]
    width = max(len(x) for x in batch)
    input_ids = torch.full((len(batch), width), tok.pad_token_id)
    for j, x in enumerate(batch):
        input_ids[j, : len(x)] = x
    mask = (input_ids != tok.pad_token_id).long()
    return {"input_ids": input_ids, "attention_mask": mask, "labels": input_ids.masked_fill(mask == 0, -100)}


args = TrainingArguments(**_sequential_args(out), remove_unused_columns=False, learning_rate=1e-3)
c = CurriculumConfig(num_stages=3, epochs_per_stage=1, tau_start=1, tau_end=1, alpha_start=0, alpha_end=0,
                     lr_schedule="global")  # fmt: skip
one_process = Curriculum.from_reflected(rows, batch_size=2, curriculum=c)  # per-device batch, as typed by hand
plan = Curriculum.from_reflected(rows, args=args, curriculum=c)


def trainer(cur):
    return Trainer(model=load_model(student), args=args, train_dataset=cur.dataset(rows), data_collator=collator)


try:
    one_process.attach(trainer(one_process))
    refused = ""
except ValueError as e:
    refused = str(e)
t = trainer(plan)
plan.attach(t)
t.train()
stages_logged = [r["srd_stage"] for r in t.state.log_history if "loss" in r]
result = {"refused": refused, "rows_per_step": plan.batch_size, "steps": t.state.global_step,
          "plan_steps": plan.total_steps, "stages": stages_logged}  # fmt: skip
(out / f"result-rank{t.args.process_index}.json").write_text(json.dumps(result))
