"""Encoder-decoder students (T5, BART) through the same data, loss, reflection, curriculum and eval."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from srd.cli import main
from srd.data.example import Example
from srd.data.tokenize import IGNORE_INDEX, collate, encode_example
from srd.generation.decode import generate_responses
from srd.models.features import teacher_features
from srd.train.step import DistillModule
from tests.conftest import make_bart, make_t5
from tests.test_srd_run import _args, srd_data  # noqa: F401

EXAMPLES = [
    Example(id="a", instruction="Summarize the text.", input="The cat sat on the mat all day.", output="A cat sat."),
    Example(id="b", instruction="Name a colour.", input="", output="Blue is a colour of the sky."),
    Example(id="c", instruction="Say hi.", input="", output="Hi"),
]


def test_seq2seq_encoding_keeps_decoder_targets_unshifted(tokenizer):
    e = encode_example(tokenizer, EXAMPLES[0], fmt="alpaca", max_prompt_len=64, max_len=96, seq2seq=True)
    response = tokenizer(EXAMPLES[0].output, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    assert e.labels == response and e.n_loss_targets == len(response)  # every decoder label is a target
    batch = collate(
        [e, encode_example(tokenizer, EXAMPLES[2], fmt="alpaca", max_prompt_len=64, max_len=96, seq2seq=True)], 0
    )
    assert batch["input_ids"].shape[1] % 8 == 0 and batch["labels"].shape[1] % 8 == 0
    assert (batch["labels"][1] == IGNORE_INDEX).sum() > 0  # the shorter response is padded with -100


@pytest.mark.parametrize("maker", [make_t5, make_bart])
def test_seq2seq_kd_loss_matches_full_logits_in_float64(tokenizer, maker):
    teacher, student = maker(len(tokenizer), layers=2, seed=1).eval(), maker(len(tokenizer), layers=1, seed=2).eval()
    enc = [encode_example(tokenizer, ex, fmt="alpaca", max_prompt_len=64, max_len=96, seq2seq=True) for ex in EXAMPLES]
    batch = collate(enc, 0)
    module = DistillModule(student, divergence="fkl", tau=2.0, beta=None, chunk_size=5, vocab_size=len(tokenizer))
    with torch.no_grad():
        t_in, t_head = teacher_features(teacher, batch)
        sums = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_in, t_head)
        labels = batch["labels"]
        dec = student.prepare_decoder_input_ids_from_labels(labels=labels)
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], decoder_input_ids=dec)
        t = teacher(**kw).logits.double().numpy()
        s = student(**kw).logits.double().numpy()
    mask = (labels != IGNORE_INDEX).numpy()
    t, s, y = t[mask] / 2.0, s[mask] / 2.0, labels.numpy()[mask]

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    lp, lq = log_softmax(t), log_softmax(s)
    kl = (np.exp(lp) * (lp - lq)).sum()
    ce = -log_softmax(s * 2.0)[np.arange(len(y)), y].sum()
    assert sums.n_tokens == int(mask.sum())
    assert sums.kd.item() == pytest.approx(kl, rel=1e-4)
    assert sums.ce.item() == pytest.approx(ce, rel=1e-4)


@pytest.mark.parametrize("maker", [make_t5, make_bart])
def test_seq2seq_generation(tokenizer, maker):
    model = maker(len(tokenizer), layers=1, seed=3).eval()
    prompts = [tokenizer(f"{ex.instruction} {ex.input}")["input_ids"] for ex in EXAMPLES]
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=6, batch_size=2, stop_strings=["###"])
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_srd_run_with_a_seq2seq_pair(tmp_path, tiny_models, srd_data, family):  # noqa: F811
    models = {"llama-teacher": tiny_models[f"{family}-teacher"], "llama-student": tiny_models[f"{family}-student"]}
    extra = [
        "compare.baseline=true",
        f"eval.benchmarks=[{srd_data['dev']}]",
        "eval.models=[teacher, baseline, final]",
        "eval.greedy=true",
        "eval.max_new_tokens=4",
    ]
    assert main(_args("run", models, srd_data, tmp_path, *extra)) == 0
    run = tmp_path / "x"
    manifest = [json.loads(x) for x in (run / "reflection" / "manifest.jsonl").read_text().splitlines()]
    assert len(manifest) == 20 and all(np.isfinite(r["scores"]["ce"]) for r in manifest)
    results = json.loads((run / "results.json").read_text())
    assert [s["examples"] for s in results["stages"]] == [5, 10, 15]
    rows = [json.loads(x) for x in (run / "stages" / "stage-3" / "logs" / "train.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)
    assert (run / "baseline" / "eval" / "greedy" / "summary.json").exists()
    assert (run / "comparison.md").exists()
