"""On-policy KD (GKD): the student answers the batch's prompts and learns from the teacher
on its own answers.

For a micro-batch chosen to be on-policy (a share `on_policy.ratio` of them, decided by a
seeded draw per step and micro-batch, so a resumed run makes the same choices), the student
samples a response to each prompt (temperature 1, top-k 0, top-p 1, up to 256 new tokens by
default, stop at EOS). The training sequence is prompt + sampled tokens, and the labels are
the sampled tokens themselves in the Hugging Face convention (`labels[i] = input_ids[i]`,
predicted from position i - 1; the loss shifts once, in `target_positions`), with a sampled
EOS kept as the last target. docs/method.md, section 4: the reference sampler shifts the labels of
generated text wrongly and drops the EOS; `tests/test_onpolicy.py` pins both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from srd.data.tokenize import IGNORE_INDEX, Encoded
from srd.generation.decode import decode_stream, logits_processors


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
    seeds: Sequence[int],
    max_len: int,
    batch_size: int | None = None,
) -> list[Encoded]:
    """Each example with its reference response replaced by one the student samples.

    Every row draws from its own counter-based stream (`seeds`, one per row), so a row's sample
    does not depend on which rows it is decoded with: the micro-batches of a step go through one
    continuous-batching stream of at most `batch_size` rows (default: all of them)."""

    if len(seeds) != len(encoded):
        raise ValueError(f"sample_responses: {len(seeds)} seeds for {len(encoded)} rows")
    was_training = student.training
    student.eval()
    new: list[list[int]] = [[] for _ in encoded]
    for i, ids in decode_stream(
        student,
        tokenizer,
        [prompt_ids(e) for e in encoded],
        batch_size=max(1, batch_size or len(encoded)),
        max_new_tokens=max_new_tokens,
        do_sample=True,
        processors=logits_processors(True, temperature, top_k, top_p, 0),
        stop_strings=(),
        seeds=seeds,
        keep_eos=True,
    ):
        new[i] = ids
    student.train(was_training)
    return [with_response(e, r, max_len) for e, r in zip(encoded, new)]
