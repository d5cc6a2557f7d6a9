"""Teacher/student tokenizer compatibility and vocabulary alignment.

White-box KD compares distributions over the same vocabulary, so the tokenizers must
agree. Checkpoints often pad their embedding matrices past the tokenizer's size (Qwen2.5:
151,936 rows for 0.5B-3B vs 152,064 for 7B); those extra rows are never real tokens, so
both sides' logits are sliced to the tokenizer's vocabulary. A real mismatch fails here,
before any compute.
"""

from __future__ import annotations

from typing import Any

from srd.models.load import ModelError


def check_tokenizers(teacher_tok: Any, student_tok: Any) -> None:
    """Raise ModelError unless the two tokenizers map the same strings to the same ids."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if tv != sv:
        only_t = sorted(set(tv) - set(sv))[:5]
        only_s = sorted(set(sv) - set(tv))[:5]
        moved = [t for t in tv if t in sv and tv[t] != sv[t]][:5]
        raise ModelError(
            f"teacher and student tokenizers differ (teacher {len(tv)} tokens, student {len(sv)}; "
            f"only in teacher e.g. {only_t}, only in student e.g. {only_s}, different ids e.g. {moved}). "
            "White-box KD needs a shared vocabulary: pick a student from the teacher's family, "
            "or build one with `srd prune`."
        )
    for attr in ("eos_token_id", "bos_token_id"):
        if getattr(teacher_tok, attr) != getattr(student_tok, attr):
            raise ModelError(
                f"teacher and student tokenizers disagree on {attr} "
                f"({getattr(teacher_tok, attr)} vs {getattr(student_tok, attr)})"
            )


def aligned_vocab_size(tokenizer: Any, *models: Any) -> int:
    """The number of logit columns compared: the tokenizer's vocabulary.

    Each model must have at least that many output rows (padding rows are sliced off).
    """
    size = len(tokenizer)
    for model in models:
        rows = model.get_output_embeddings().weight.shape[0]
        if rows < size:
            raise ModelError(
                f"{type(model).__name__} has {rows} output rows but the tokenizer has {size} tokens; "
                "the model and tokenizer do not belong together"
            )
    return size
