"""Resumable checkpoints, written atomically.

A checkpoint folder `checkpoints/step-000050/` holds the student as a Hugging Face model
(config + safetensors, loadable on its own), the optimizer and scheduler states, every
process's RNG states, and `state.json` (step, best metric, elapsed time, and the size and
SHA-256 of every other file). It is written into a hidden temporary folder and renamed into
place, so a crash never leaves a half-written checkpoint that resume would pick up; a file
damaged later (a full disk, a cut copy) is found by `verify_checkpoint` before resuming, and
the error names it and the way on.
"""

from __future__ import annotations

import os
import pickle
import re
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from srd.models.save import is_peft, read_model_digests
from srd.utils import (
    TMP_TAG,
    DamagedFileError,
    atomic_write_json,
    digest_mismatch,
    file_digests,
    read_json,
    replace_dir,
    sha256_file,
    tmp_sibling,
)

STEP_DIR = re.compile(r"^step-(\d+)$")


class CheckpointError(ValueError):
    """A checkpoint or model folder on disk is damaged; the message names the file and what to do."""


def link_model_dir(src: Path, out: Path, skip: tuple[str, ...] = ("metrics.json",)) -> None:
    """Make `out` the model folder `src` again without a second copy of its weights on disk.

    Every file of `out` is a hard link to the same file of `src` (a copy where the file system
    has none), put in place atomically. Safe because srd never rewrites a model folder's file in
    place: `save_model_dir` replaces the whole folder, so the other one keeps the old files.
    `skip`: names left out (best/'s metrics.json)."""
    tmp = tmp_sibling(out)
    if tmp.exists():
        shutil.rmtree(tmp)

    def link_or_copy(a: str, b: str) -> None:
        try:
            os.link(a, b)
        except OSError:  # no hard links here (another device, some network file systems)
            shutil.copy2(a, b)

    shutil.copytree(src, tmp, copy_function=link_or_copy, ignore=shutil.ignore_patterns(*skip))
    replace_dir(tmp, out)


def _load_adapter(model: nn.Module, folder: Path) -> None:
    from peft import set_peft_model_state_dict

    for candidate in (folder / "adapter_model.safetensors", folder / "adapter" / "adapter_model.safetensors"):
        if candidate.exists():
            result = set_peft_model_state_dict(model, load_file(candidate))
            unexpected = list(getattr(result, "unexpected_keys", []) or [])
            if unexpected:
                raise RuntimeError(f"adapter {candidate} does not match the model: unexpected {unexpected[:5]}")
            return
    raise FileNotFoundError(
        f"no LoRA adapter in {folder} (adapter_model.safetensors or adapter/): was it trained without lora.enabled?"
    )


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every *.safetensors shard in `folder`, as one state dict; a folder srd saved has each
    shard's size and SHA-256 in srd-digests.json, checked first (a flipped byte is found)."""
    state: dict[str, torch.Tensor] = {}
    try:
        recorded = read_model_digests(Path(folder))
    except ValueError as e:
        raise CheckpointError(f"{e}; {_folder_way_on(Path(folder))}") from None
    for shard in sorted(Path(folder).glob("*.safetensors")):
        bad = digest_mismatch(Path(folder), {shard.name: recorded[shard.name]}) if shard.name in recorded else None
        if bad:
            raise CheckpointError(
                f"weights file {shard} is damaged ({bad.removeprefix(shard.name).strip(' ()')}); "
                f"{_folder_way_on(Path(folder))}"
            )
        try:
            state.update(load_file(shard))
        except Exception as e:  # safetensors raises its own error types for a cut or garbled file
            raise CheckpointError(
                f"weights file {shard} is damaged ({type(e).__name__}: {e}); {_folder_way_on(Path(folder))}"
            ) from e
    if not state:
        raise FileNotFoundError(f"no *.safetensors weights in {folder}")
    return state


def _folder_way_on(folder: Path) -> str:
    if STEP_DIR.match(folder.name):
        return way_on(folder)
    if folder.name in ("final", "best") and folder.parent.parent.name == "stages":
        return f"delete {folder.parent} and rerun the same command to train that stage again"
    return f"restore or rebuild {folder}"


def load_weights(model: nn.Module, folder: Path) -> None:
    """Load every *.safetensors shard in `folder` into `model`.

    Keys may be missing only for tied weights (e.g. lm_head tied to the embeddings),
    which share storage with a loaded parameter. A peft model loads its adapter only.
    """
    if is_peft(model):
        _load_adapter(model, folder)
        return
    state = read_weights(folder)
    missing, unexpected = model.load_state_dict(state, strict=False)
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded_ptrs = {params[k].data_ptr() for k in state if k in params}
    bad_missing = [k for k in missing if k not in params or params[k].data_ptr() not in loaded_ptrs]
    if unexpected or bad_missing:
        raise RuntimeError(
            f"checkpoint {folder} does not match the model: missing {bad_missing[:5]}, "
            f"unexpected {list(unexpected)[:5]}"
        )


def list_checkpoints(ckpt_root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (those with state.json), oldest first."""
    if not ckpt_root.exists():
        return []
    found = []
    for d in ckpt_root.iterdir():
        m = STEP_DIR.match(d.name)
        if m and (d / "state.json").exists():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest_checkpoint(ckpt_root: Path) -> Path | None:
    found = list_checkpoints(ckpt_root)
    return found[-1][1] if found else None


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        return read_json(ckpt / "state.json")
    except OSError as e:
        raise CheckpointError(f"{ckpt / 'state.json'} is damaged ({e}); {way_on(ckpt)}") from e
    except DamagedFileError as e:
        raise CheckpointError(f"{ckpt / 'state.json'} is damaged ({e.why}); {way_on(ckpt)}") from None


def way_on(ckpt: Path) -> str:
    """What to do about a damaged checkpoint: resume from the one before it, or restart its stage."""
    earlier = [d for step, d in list_checkpoints(ckpt.parent) if d != ckpt and d.name < ckpt.name]
    if earlier:
        return f"delete {ckpt} and rerun the same command to resume from {earlier[-1]}"
    return (
        f"delete {ckpt} and rerun the same command: this stage restarts from its beginning "
        "(finished stages and reflection are kept)"
    )


def verify_checkpoint(ckpt: Path) -> None:
    """Raise CheckpointError if a file of `ckpt` is missing, cut short or changed since it was
    saved (sizes and SHA-256 in state.json; checkpoints from before the digests: sizes unknown,
    only the files' loading is checked, by the caller)."""
    files = read_state(ckpt).get("files")
    for name, want in (files or {}).items():
        path = ckpt / name
        if not path.exists():
            raise CheckpointError(f"checkpoint file {path} is missing; {way_on(ckpt)}")
        size = path.stat().st_size
        if size != want["size"]:
            raise CheckpointError(
                f"checkpoint file {path} is {size:,} bytes but was saved with {want['size']:,} (cut short or "
                f"overwritten); {way_on(ckpt)}"
            )
        if sha256_file(path) != want["sha256"]:
            raise CheckpointError(f"checkpoint file {path} has changed since it was saved (corrupted); {way_on(ckpt)}")


def load_state(path: Path, map_location: Any = None, allowed: Sequence[Any] = ()) -> Any:
    """Optimizer, scheduler or RNG state saved by torch.save, loaded with weights_only=True:
    tensors, plain Python values and NumPy arrays (the RNG state) only, so a checkpoint folder
    from someone else cannot run code when a run resumes from it. Anything else is refused with
    one line naming the file. `allowed`: more plain-data classes the caller vouches for (DeepSpeed's
    ZeRO records)."""
    import numpy as np

    reconstruct = np.ndarray((0,)).__reduce__()[0]  # numpy's array constructor for pickles
    safe = [reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32)), *allowed]
    try:
        with torch.serialization.safe_globals(safe):
            return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path} holds objects other than tensors and plain values, which srd does not load (loading them "
            f"could run code: {str(e).splitlines()[0][:160]}); delete {path.parent} to restart from the previous "
            "checkpoint, or the stage's checkpoints/ folder to restart the stage"
        ) from None


def prune_checkpoints(ckpt_root: Path, keep_last: int) -> None:
    for _, d in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)


def tmp_checkpoint_dir(ckpt_root: Path, step: int) -> Path:
    return ckpt_root / f".step-{step:06d}{TMP_TAG}"


def finish_checkpoint(ckpt_root: Path, step: int, state: dict[str, Any]) -> Path:
    """Write state.json last, then move the folder into place (main process only)."""
    tmp = tmp_checkpoint_dir(ckpt_root, step)
    atomic_write_json(tmp / "state.json", {**state, "files": file_digests(tmp)})
    final = ckpt_root / f"step-{step:06d}"
    replace_dir(tmp, final)
    return final
