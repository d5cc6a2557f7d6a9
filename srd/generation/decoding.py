"""How answers are decoded, as one value every caller builds and every backend reads."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from srd.config import GenerationConfig


@dataclass(frozen=True, kw_only=True)
class Decoding:
    """How answers are decoded: one value that reflection, dev ROUGE-L and evaluation each build
    once (`Decoding.of(cfg.generation, ...)` from a run's generation section) and hand to
    iter_responses / generate_responses."""

    max_new_tokens: int
    batch_size: int = 16  # prompts decoded together
    do_sample: bool = False  # false: greedy
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    no_repeat_ngram_size: int = 0  # 0: off
    stop_strings: tuple[str, ...] = ()  # answers are cut at the first of these
    backend: str = "loop"  # a name in BACKENDS
    # static backend: the KV cache length of every call (e.g. the prompt limit + max_new_tokens),
    # so that calls on different prompts reuse one compiled graph; grown when a call needs more
    static_cache_len: int | None = None

    @classmethod
    def of(cls, generation: GenerationConfig, **changes: Any) -> Decoding:
        """The decoding a run's `generation` section describes, with `changes`."""
        g = generation
        base = cls(
            max_new_tokens=g.max_new_tokens,
            batch_size=g.batch_size,
            do_sample=g.do_sample,
            temperature=g.temperature,
            top_k=g.top_k,
            top_p=g.top_p,
            no_repeat_ngram_size=g.no_repeat_ngram_size,
            stop_strings=tuple(g.stop_strings),
            backend=g.backend,
        )
        return dataclasses.replace(base, **changes)
