"""Generation: answers from a model for reflection, dev ROUGE-L, on-policy samples and
evaluation. `Decoding` says how (one value per caller, `Decoding.of(cfg.generation)` for a
run's generation section); `BACKENDS` holds the implementations by name (`loop`, `hf`,
`static`, `vllm`), each with the same decoding rules (srd.generation.decode)."""

from srd.generation.decode import (
    BACKENDS,
    generate_responses,
    iter_responses,
    register_backend,
    row_seeds,
    work_blocks,
)
from srd.generation.decoding import Decoding
from srd.generation.stops import cut_at_stop

__all__ = [
    "BACKENDS",
    "Decoding",
    "cut_at_stop",
    "generate_responses",
    "iter_responses",
    "register_backend",
    "row_seeds",
    "work_blocks",
]
