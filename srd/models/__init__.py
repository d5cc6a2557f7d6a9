"""Models: loading (Hub / folder / GGUF / bundled), depth pruning, vocabulary alignment."""

from srd.models.load import (
    BUNDLED_MODELS,
    ModelError,
    bundled_gguf_path,
    dtype_from_name,
    gguf_to_hf,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from srd.models.prune import build_pruned, choose_layers, decoder_layers, perplexity, skip_layers
from srd.models.vocab import aligned_vocab_size, check_tokenizers

__all__ = [
    "BUNDLED_MODELS",
    "ModelError",
    "aligned_vocab_size",
    "build_pruned",
    "bundled_gguf_path",
    "check_tokenizers",
    "choose_layers",
    "decoder_layers",
    "dtype_from_name",
    "gguf_to_hf",
    "load_model",
    "load_tokenizer",
    "perplexity",
    "resolve_model_path",
    "skip_layers",
]
