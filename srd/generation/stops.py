"""Where an answer ends: the template's stop strings (an Alpaca-prompted model goes on to write
a new "### Instruction:"), found cheaply while decoding and cut off afterwards."""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch


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


_STOP_CANDIDATES: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], frozenset[int]]] = weakref.WeakKeyDictionary()


def stop_candidates(tokenizer: Any, stop_strings: Sequence[str]) -> frozenset[int]:
    """Ids of the tokens that can complete a stop string: their text holds a stop string's last
    character, or is not plain text on its own (an empty or partial-UTF-8 piece). A row whose new
    token is not one of them cannot have just written a stop string, so it is not decoded."""
    cached = _STOP_CANDIDATES.setdefault(tokenizer, {})
    key = tuple(stop_strings)
    if key not in cached:
        lasts = {s[-1] for s in stop_strings if s}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        cached[key] = frozenset(i for i, t in enumerate(texts) if not t or "\ufffd" in t or any(c in t for c in lasts))
    return cached[key]
