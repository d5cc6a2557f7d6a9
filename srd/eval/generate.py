"""Batched generation for dev evaluation (and later reflection and benchmarks).

Prompts are sorted by length so each batch pads little, left-padded (decoder-only
models continue from the right edge), and stopped at EOS and at template stop strings
(an Alpaca-prompted instruct model otherwise writes a new "### Instruction:").
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from srd.data.tokenize import pad_id


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string, stripped."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


class StopOnStrings:
    """Stop a sequence once its generated text contains a stop string.

    Decodes only the last `window` new tokens of each row per step: cheaper than
    transformers' StopStringCriteria, whose set-up over a 50k-150k vocabulary costs
    seconds per `generate` call on a CPU.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_len: int, window: int = 12) -> None:
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_len, self.window = prompt_len, window

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        tails = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in tails], device=input_ids.device)


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    progress: bool = False,
    desc: str = "generating",
) -> list[str]:
    """Responses (decoded, cut at stop strings) for token-id prompts, in input order."""
    if not prompts:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        no_repeat_ngram_size=no_repeat_ngram_size or None,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    else:  # keep the model's generation_config sampling defaults from warning/overriding
        kwargs.update(temperature=None, top_k=None, top_p=None)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        ids, mask = _left_pad([prompts[i] for i in idx], pad_id(tokenizer))
        criteria = []
        if stop_strings:
            from transformers import StoppingCriteriaList

            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, ids.shape[1])])
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), stopping_criteria=criteria, **kwargs
        )
        new = gen[:, ids.shape[1] :]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop_strings)
    model.train(was_training)
    return out
