"""Tokenisation (prompt masked, response + EOS as targets), collation and length buckets."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from srd.data.example import Example
from srd.data.prompts import encode_prompt

IGNORE_INDEX = -100


@dataclass
class Encoded:
    """One tokenised training example. `labels[i]` is the target for `input_ids[i]`
    in the Hugging Face convention (the model's logits at i - 1 predict it)."""

    id: str
    input_ids: list[int]
    labels: list[int]
    # encoder-decoder models: input_ids is the encoder's input (the prompt) and labels the
    # decoder's targets (response + EOS, not shifted: decoder position i predicts labels[i])
    seq2seq: bool = False

    @property
    def n_targets(self) -> int:
        return sum(1 for t in self.labels if t != IGNORE_INDEX)

    @property
    def n_loss_targets(self) -> int:
        """Tokens the loss counts: causal LMs predict labels[1:] (position i - 1 predicts i)."""
        labels = self.labels if self.seq2seq else self.labels[1:]
        return sum(1 for t in labels if t != IGNORE_INDEX)


def eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; set tokenizer.eos_token before training")
    return int(tokenizer.eos_token_id)


def pad_id(tokenizer: Any) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id(tokenizer))


def encode_example(
    tokenizer: Any, ex: Example, *, fmt: str, max_prompt_len: int, max_len: int, seq2seq: bool = False
) -> Encoded:
    """Prompt tokens (masked) + response tokens + EOS (targets), truncated to `max_len`.

    seq2seq: the prompt is the encoder input and response + EOS the decoder labels."""
    prompt = encode_prompt(tokenizer, ex, fmt, max_prompt_len)
    response = tokenizer(ex.target, add_special_tokens=False)["input_ids"] + [eos_id(tokenizer)]
    response = response[: max_len - len(prompt)]
    if seq2seq:
        return Encoded(id=ex.id, input_ids=prompt, labels=response, seq2seq=True)
    return Encoded(
        id=ex.id,
        input_ids=prompt + response,
        labels=[IGNORE_INDEX] * len(prompt) + response,
    )


def encode_examples(
    tokenizer: Any, examples: Sequence[Example], *, fmt: str, max_prompt_len: int, max_len: int, seq2seq: bool = False
) -> list[Encoded]:
    return [
        encode_example(tokenizer, ex, fmt=fmt, max_prompt_len=max_prompt_len, max_len=max_len, seq2seq=seq2seq)
        for ex in examples
    ]


def collate(batch: Sequence[Encoded], pad_token_id: int, pad_to_multiple_of: int = 8) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids, attention_mask, labels (padding = -100)."""
    if batch and batch[0].seq2seq:
        return _collate_seq2seq(batch, pad_token_id, pad_to_multiple_of)
    longest = max(len(e.input_ids) for e in batch)
    if pad_to_multiple_of > 1:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _collate_seq2seq(batch: Sequence[Encoded], pad_token_id: int, multiple: int) -> dict[str, torch.Tensor]:
    """Encoder inputs and decoder labels padded separately (each to its own longest row)."""

    def width(n: int) -> int:
        return -(-n // multiple) * multiple if multiple > 1 else n

    src, tgt = width(max(len(e.input_ids) for e in batch)), width(max(len(e.labels) for e in batch))
    ids = torch.full((len(batch), src), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), src), dtype=torch.long)
    labels = torch.full((len(batch), tgt), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(batch):
        ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
        mask[i, : len(e.input_ids)] = 1
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def bucketed_batches(
    lengths: Sequence[int], batch_size: int, *, seed: int, epoch: int, bucket_size: int = 64
) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so padding stays small.

    Indices are shuffled (deterministically from seed and epoch), cut into groups of
    `bucket_size` batches, sorted by length inside each group, split into batches, and
    the batch order shuffled again. Every index appears exactly once.
    """
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(len(lengths))
    group = batch_size * bucket_size
    batches: list[list[int]] = []
    for start in range(0, len(perm), group):
        chunk = sorted(perm[start : start + group].tolist(), key=lambda i: -lengths[i])
        batches.extend(chunk[j : j + batch_size] for j in range(0, len(chunk), batch_size))
    order = rng.permutation(len(batches))
    return [batches[i] for i in order]
