"""The decode loop (finished rows leave the batch) against transformers' generate."""

from __future__ import annotations

import pytest
import torch

from srd.eval.generate import generate_responses
from tests.conftest import make_gpt2, make_llama


def _prompts(tokenizer):
    texts = [
        "Below is an instruction. ### Instruction: name a colour",
        "hi",
        "Write a short story about a cat and a dog who become friends",
        "2 + 2 =",
        "The capital of France is",
    ]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("maker", [make_llama, make_gpt2])
@pytest.mark.parametrize("no_repeat", [0, 3])
def test_greedy_loop_equals_hf_generate(tokenizer, maker, no_repeat):
    model = maker(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    kwargs = dict(max_new_tokens=12, batch_size=3, no_repeat_ngram_size=no_repeat, stop_strings=["###"])
    loop = generate_responses(model, tokenizer, prompts, backend="loop", **kwargs)
    hf = generate_responses(model, tokenizer, prompts, backend="hf", **kwargs)
    assert loop == hf
    assert any(loop)  # something was generated
    # the static-cache path: one cache size, the last batch (2 prompts) filled to 3 and cut back
    static = generate_responses(model, tokenizer, prompts, backend="static", **kwargs)
    assert static == loop


def test_finished_rows_leave_the_batch(tokenizer):
    """A row that hits EOS at once stops costing forward passes; the others go on."""
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] *= 0  # EOS never wins by itself ...
    prompts = _prompts(tokenizer)[:3]
    widths = []
    real_forward = model.forward

    def forward(*args, **kwargs):
        widths.append(kwargs["input_ids"].shape[0])
        out = real_forward(*args, **kwargs)
        if len(widths) == 1:  # ... except for row 0 of the first step (the longest prompt, sorted first)
            out.logits[0, -1, :] = -1e9
            out.logits[0, -1, eos] = 0.0
        return out

    model.forward = forward
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert widths == [3, 2, 2, 2, 2]  # prefill with 3 rows, then 2 live rows for 4 more tokens
    assert sum(t == "" for t in texts) == 1


def test_sampling_is_seeded(tokenizer):
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    kw = dict(max_new_tokens=10, batch_size=2, do_sample=True, top_k=0, top_p=1.0)
    a = generate_responses(model, tokenizer, prompts, seed=10, **kw)
    b = generate_responses(model, tokenizer, prompts, seed=10, **kw)
    c = generate_responses(model, tokenizer, prompts, seed=20, **kw)
    assert a == b and a != c
