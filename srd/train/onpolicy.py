"""On-policy KD (GKD): the student answers the batch's prompts and learns from the teacher
on its own answers.

For a micro-batch chosen to be on-policy (a share `on_policy.ratio` of them, decided by a
seeded draw per step and micro-batch, so a resumed run makes the same choices), the student
samples a response to each prompt (temperature 1, top-k 0, top-p 1, up to 256 new tokens by
default, stop at EOS). The training sequence is prompt + sampled tokens, and the labels are
the sampled tokens themselves in the Hugging Face convention (`labels[i] = input_ids[i]`,
predicted from position i - 1; the loss shifts once, in `target_positions`), with a sampled
EOS kept as the last target. SRD-NOTES sec. 3: the reference sampler shifts the labels of
generated text wrongly and drops the EOS; `tests/test_onpolicy.py` pins both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from srd.data.tokenize import IGNORE_INDEX, Encoded


def on_policy_flags(seed: int, step: int, n_micro: int, ratio: float) -> list[bool]:
    """Which of a step's micro-batches (over all processes) are on-policy: a seeded draw."""
    if ratio <= 0.0:
        return [False] * n_micro
    if ratio >= 1.0:
        return [True] * n_micro
    rng = np.random.default_rng([seed, step, 0x6B64])
    return [bool(x) for x in rng.random(n_micro) < ratio]


def prompt_ids(e: Encoded) -> list[int]:
    """The prompt part of an encoded example (everything before its first target)."""
    first = next((i for i, t in enumerate(e.labels) if t != IGNORE_INDEX), len(e.labels))
    return e.input_ids[:first]


def with_response(e: Encoded, response: Sequence[int], max_len: int) -> Encoded:
    """prompt + response as a training example: the response tokens are the targets."""
    prompt = prompt_ids(e)
    response = list(response)[: max(0, max_len - len(prompt))]
    return Encoded(id=e.id, input_ids=prompt + response, labels=[IGNORE_INDEX] * len(prompt) + response)


@torch.no_grad()
def sample_responses(
    student: Any,
    tokenizer: Any,
    encoded: Sequence[Encoded],
    *,
    max_new_tokens: int,
    temperature: float,
    top_k: int,
    top_p: float,
    seed: int,
    max_len: int,
) -> list[Encoded]:
    """The batch with each reference response replaced by one the student samples."""
    from srd.eval.generate import decode_batch, logits_processors

    was_training = student.training
    student.eval()
    generator = torch.Generator(device=next(student.parameters()).device)
    generator.manual_seed(seed)
    new = decode_batch(
        student,
        tokenizer,
        [prompt_ids(e) for e in encoded],
        max_new_tokens=max_new_tokens,
        do_sample=True,
        processors=logits_processors(True, temperature, top_k, top_p, 0),
        stop_strings=(),
        generator=generator,
        keep_eos=True,
    )
    student.train(was_training)
    return [with_response(e, r, max_len) for e, r in zip(encoded, new)]
