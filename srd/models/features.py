"""What a forward pass gives distillation: a model's features at the target positions (hidden
states and the head that maps them to logits, or logits), shared by training, the teacher
cache and reflection's cross-entropy pass; per-block compiling; a fingerprint of the weights."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import Tensor, nn

from srd.config import ConfigError
from srd.data.tokenize import IGNORE_INDEX
from srd.models.load import is_seq2seq, splittable

COMPILE_BACKEND = "inductor"  # torch.compile's default; tests use a lighter one


def transformer_blocks(model: nn.Module, option: str) -> list[nn.Module]:
    """The transformer blocks of `model`: modules of the classes its `_no_split_modules` names.
    `option` (the setting that needs them) goes into the error when there are none."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    if not blocks:
        raise ConfigError(
            f"{option}: {type(model).__name__} names no transformer block classes (_no_split_modules), "
            f"and {option} works per block; turn it off"
        )
    return blocks


def compile_blocks(model: nn.Module) -> int:
    """Compile each transformer block of `model` in place (nn.Module.compile, so weights, state
    dicts and checkpoints are unchanged) and return how many. Blocks rather than the whole
    model: HF's forward (masks, caches, output classes) breaks graphs, and the blocks are where
    the time goes."""
    blocks = transformer_blocks(model, "train.compile")
    for block in blocks:
        if getattr(block, "_compiled_call_impl", None) is None:
            block.compile(backend=COMPILE_BACKEND)
    return len(blocks)


def features(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> tuple[Tensor, Any]:
    """(B, T, H) last hidden states and the head mapping them to logits, or (B, T, V)
    logits and the identity when the model's logits are not a plain linear map."""
    if hasattr(model, "peft_config"):  # a peft model: its LoRA layers live inside the base model
        model = model.get_base_model()
    if splittable(model):
        out = model.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state, model.get_output_embeddings()
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out.logits, nn.Identity()


def target_features(
    model: nn.Module, input_ids: Tensor, attention_mask: Tensor, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor, Any]:
    """(N, H) features at the target positions (or (N, V) logits), the (N,) targets, the
    (B, T') bool mask of those positions, and the head mapping features to logits.

    Causal LMs: position t predicts labels[t + 1]. Encoder-decoder models: the decoder reads
    the labels shifted right (the model's own decoder start token) and position t predicts
    labels[t]; their logits are taken whole (T5 rescales before its head)."""
    if is_seq2seq(model):
        base = model.get_base_model() if hasattr(model, "peft_config") else model
        decoder_input_ids = base.prepare_decoder_input_ids_from_labels(labels=labels)
        out = model(
            input_ids=input_ids, attention_mask=attention_mask, decoder_input_ids=decoder_input_ids, use_cache=False
        )
        mask = labels != IGNORE_INDEX
        return out.logits[mask], labels[mask], mask, nn.Identity()
    hidden, head = features(model, input_ids, attention_mask)
    mask, targets = target_positions(labels)
    return hidden[:, :-1][mask], targets, mask, head


def target_positions(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Mask of positions whose next token is a target, and those targets.

    Position t predicts labels[t + 1] (HF convention); returns a (B, T-1) bool mask and
    the (N,) targets in row-major order.
    """
    nxt = labels[:, 1:]
    mask = nxt != IGNORE_INDEX
    return mask, nxt[mask]


@torch.no_grad()
def teacher_features(teacher: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Any]:
    """The teacher's (N, H_t) features at the target positions, and its head."""
    selected, _, _, head = target_features(teacher, batch["input_ids"], batch["attention_mask"], batch["labels"])
    return selected, head


@torch.no_grad()
def model_fingerprint(model: Any) -> str:
    """Identity of the weights: shapes and float64 sums of every tensor (cheap, change-sensitive)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t64 = t.detach().double()
        h.update(f"{name}{tuple(t.shape)}{t64.sum().item():.10e}{t64.abs().sum().item():.10e}".encode())
    return h.hexdigest()[:16]
