"""Saving a model as a plain Hugging Face folder, atomically (LoRA students merged)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from srd.utils import atomic_write_json, file_digests, replace_dir, tmp_sibling

# in every model folder srd saves: the size and SHA-256 of each of its files, checked when it loads
MODEL_DIGESTS = "srd-digests.json"


def read_model_digests(folder: Path) -> dict[str, dict[str, Any]]:
    """The {file: {"size", "sha256"}} record save_model_dir left in `folder` ({} where there is
    none); ValueError when the record itself is damaged."""
    record = Path(folder) / MODEL_DIGESTS
    if not record.is_file():
        return {}
    try:
        files = json.loads(record.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"{record} is damaged ({type(e).__name__})") from None
    if not isinstance(files, dict):
        raise ValueError(f"{record} is damaged (no file list)")
    return files


def is_peft(model: nn.Module) -> bool:
    return hasattr(model, "peft_config")


def save_model_dir(
    model: nn.Module, tokenizer: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Save a loadable HF model folder (config, safetensors, tokenizer) atomically, with the size
    and SHA-256 of every file in MODEL_DIGESTS (load_model checks them: a flipped byte is found).

    A peft (LoRA) model is saved merged, so the folder loads anywhere, with the adapter
    alone in `out/adapter/` (what the next curriculum stage continues from). `state_dict`:
    the full weights of a sharded (FSDP) model, gathered by srd.train.distributed."""
    tmp = tmp_sibling(out)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    if is_peft(model):
        import copy

        model.save_pretrained(tmp / "adapter", safe_serialization=True)
        copy.deepcopy(model).merge_and_unload().save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    atomic_write_json(tmp / MODEL_DIGESTS, {"files": file_digests(tmp, skip=(MODEL_DIGESTS,))})
    replace_dir(tmp, out)
