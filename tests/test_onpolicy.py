"""On-policy KD (GKD): label alignment of sampled text, kept EOS, seeded choices, exact resume."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from srd.cli import main
from srd.data.tokenize import IGNORE_INDEX, Encoded
from srd.generation.decode import row_seeds
from srd.models.features import target_positions
from srd.train.onpolicy import on_policy_flags, sample_responses, with_response
from tests.conftest import make_llama
from tests.test_srd_run import _args, srd_data  # noqa: F401


def test_sampled_response_labels_are_aligned_and_keep_eos():
    eos = 2
    ref = Encoded(id="a", input_ids=[5, 6, 7, 40, 41, eos], labels=[IGNORE_INDEX] * 3 + [40, 41, eos])
    e = with_response(ref, [11, 12, eos], max_len=64)
    assert e.input_ids == [5, 6, 7, 11, 12, eos]
    assert e.labels == [IGNORE_INDEX] * 3 + [11, 12, eos]  # labels[i] = input_ids[i] on the response
    mask, targets = target_positions(torch.tensor([e.labels]))
    # the last prompt token (position 2) predicts the first sampled token; the EOS is the last target
    assert mask[0].nonzero().flatten().tolist() == [2, 3, 4]
    assert targets.tolist() == [11, 12, eos]
    assert with_response(ref, [11, 12, 13, 14], max_len=5).input_ids == [5, 6, 7, 11, 12]  # max_len


def test_student_samples_keep_the_generated_eos(tokenizer, monkeypatch):
    import srd.generation.decode as gen

    model = make_llama(len(tokenizer), layers=2, seed=3).eval()
    eos = tokenizer.eos_token_id
    calls = []
    real = gen.step_logits

    def step_logits(model, **inputs):
        logits = real(model, **inputs)
        calls.append(1)
        if len(calls) == 3:  # the third token of every row is EOS
            logits[:, :] = -1e9
            logits[:, eos] = 0.0
        return logits

    monkeypatch.setattr(gen, "step_logits", step_logits)
    prompt = tokenizer("Name a colour.")["input_ids"]
    encs = [Encoded(id=str(i), input_ids=prompt + [eos], labels=[IGNORE_INDEX] * len(prompt) + [eos]) for i in range(2)]
    out = sample_responses(
        model, tokenizer, encs, max_new_tokens=8, temperature=1.0, top_k=0, top_p=1.0, seeds=[0, 1], max_len=64
    )
    for e in out:
        response = e.input_ids[len(prompt) :]
        assert len(response) == 3 and response[-1] == eos
        assert e.labels == [IGNORE_INDEX] * len(prompt) + response


def test_a_sample_does_not_depend_on_the_rows_decoded_with_it(tokenizer):
    """Each row draws from its own seeded generator, so the micro-batches of a step can share
    one continuous-batching stream: together or alone, a row samples the same answer."""
    model = make_llama(len(tokenizer), layers=2, seed=3).eval()
    eos = tokenizer.eos_token_id
    texts = ["Name a colour.", "Write a long story about a dragon", "2 + 2 =", "Hello"]
    encs = []
    for i, t in enumerate(texts):
        prompt = tokenizer(t)["input_ids"]
        encs.append(Encoded(id=str(i), input_ids=prompt + [eos], labels=[IGNORE_INDEX] * len(prompt) + [eos]))
    kw = dict(max_new_tokens=10, temperature=1.0, top_k=0, top_p=1.0, max_len=64)
    seeds = row_seeds(7, len(encs))
    together = sample_responses(model, tokenizer, encs, seeds=seeds, batch_size=2, **kw)
    alone = [sample_responses(model, tokenizer, [e], seeds=[s], **kw)[0] for e, s in zip(encs, seeds)]
    assert [e.input_ids for e in together] == [e.input_ids for e in alone]
    other = sample_responses(model, tokenizer, encs, seeds=row_seeds(8, len(encs)), **kw)
    assert [e.input_ids for e in other] != [e.input_ids for e in together]
    with pytest.raises(ValueError, match="2 seeds for 4 rows"):
        sample_responses(model, tokenizer, encs, seeds=seeds[:2], **kw)


def test_on_policy_flags_are_seeded():
    a = on_policy_flags(0, 5, 1000, 0.5)
    assert a == on_policy_flags(0, 5, 1000, 0.5) and a != on_policy_flags(0, 6, 1000, 0.5)
    assert 400 < sum(a) < 600
    assert on_policy_flags(0, 5, 4, 0.0) == [False] * 4 and on_policy_flags(0, 5, 4, 1.0) == [True] * 4


def _gkd(tiny_models, data, out, *extra):
    return _args(
        "train",
        tiny_models,
        data,
        out,
        "method=gkd",
        "loss.alpha=0",
        "train.max_steps=4",
        "train.save_every=2",
        "on_policy.max_new_tokens=6",
        *extra,
    )


def test_gkd_train_logs_generation_and_resumes_exactly(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_gkd(tiny_models, srd_data, tmp_path / "a")) == 0
    run = tmp_path / "a" / "x"
    rows = [json.loads(x) for x in (run / "logs" / "train.jsonl").read_text().splitlines()]
    assert all("on_policy_batches" in r for r in rows) and sum(r["on_policy_batches"] for r in rows) > 0
    done = json.loads((run / "done.json").read_text())
    assert done["on_policy_ratio"] == 0.5 and done["generation_s"] > 0
    assert main(_gkd(tiny_models, srd_data, tmp_path / "b", "train.stop_after_steps=2")) == 0
    assert main(_gkd(tiny_models, srd_data, tmp_path / "b")) == 0
    a = load_file(run / "final" / "model.safetensors")
    b = load_file(tmp_path / "b" / "x" / "final" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_srd_over_gkd_trains_a_gkd_baseline(tmp_path, tiny_models, srd_data):  # noqa: F811
    args = _args(
        "run",
        tiny_models,
        srd_data,
        tmp_path,
        "on_policy.ratio=0.5",
        "on_policy.max_new_tokens=4",
        "curriculum.alpha_start=0",
        "curriculum.alpha_end=0",
        "loss.alpha=0",
        "compare.baseline=true",
    )
    assert main(args) == 0
    res = json.loads((tmp_path / "x" / "results.json").read_text())
    base = json.loads((tmp_path / "x" / "baseline" / "results.json").read_text())
    assert res["on_policy_ratio"] == 0.5 and res["generation_s"] > 0
    assert base["method"] == "gkd" and base["generation_s"] > 0
    from srd.report import write_report

    assert "went to the student's sampling" in write_report(tmp_path / "x").read_text()


def test_gkd_samples_with_bf16_weights_and_trains_float32(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """generation.dtype=bfloat16: on-policy answers come from the student's weights in bf16,
    and the optimizer goes on updating its float32 weights (saved as float32)."""
    import srd.train.loop as loop_mod

    seen, real = [], loop_mod.sample_responses

    def spy(model, *a, **k):
        seen.append(next(model.parameters()).dtype)
        return real(model, *a, **k)

    monkeypatch.setattr(loop_mod, "sample_responses", spy)
    assert main(_gkd(tiny_models, srd_data, tmp_path, "generation.dtype=bfloat16")) == 0
    assert seen and set(seen) == {torch.bfloat16}
    final = load_file(tmp_path / "x" / "final" / "model.safetensors")
    assert {t.dtype for t in final.values()} == {torch.float32}
