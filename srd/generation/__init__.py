"""Generation: answers from a model for reflection, dev ROUGE-L, on-policy samples and
evaluation. One decoding implementation per backend (`loop`, `hf`, `static`, `vllm`), the
same decoding rules in each (srd.generation.decode)."""

from srd.generation.decode import BACKENDS, cut_at_stop, generate_responses, iter_responses, row_seeds

__all__ = ["BACKENDS", "cut_at_stop", "generate_responses", "iter_responses", "row_seeds"]
