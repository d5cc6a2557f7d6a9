"""Generation through vLLM (`generation.backend=vllm`), for reflection and evaluation on GPUs.

vLLM (PagedAttention, continuous batching, CUDA graphs) serves a model from a folder, not from
a torch module, so the model in memory is saved once to a temporary folder and an engine is
started on it; the engine is kept for later calls while the weights stay the same (reflection
calls once per chunk of prompts) and replaced when they change. Prompts go in as token ids, so
vLLM sees exactly the tokens the other backends see; answers are cut at the stop strings like
theirs. vLLM has no no-repeat-n-gram rule: a non-zero `no_repeat_ngram_size` is refused rather
than silently ignored. Sampling is seeded per prompt (`seeds`, one each), so an answer does
not depend on how vLLM schedules them.

vLLM is not a dependency (it needs CUDA); `pip install vllm` on the GPU machine. Its engine
takes `SRD_VLLM_GPU_MEMORY` (default 0.5) of the GPU's memory for weights and KV cache, leaving
the rest to the training process that shares the GPU.
"""

from __future__ import annotations

import gc
import os
import tempfile
import weakref
from collections.abc import Sequence
from typing import Any

import torch

from srd.config import ConfigError
from srd.generation.decoding import Decoding
from srd.generation.stops import cut_at_stop
from srd.models.features import model_fingerprint
from srd.models.load import dtype_name

_ENGINES: weakref.WeakKeyDictionary[Any, tuple[str, Any, Any]] = weakref.WeakKeyDictionary()


class VLLMUnavailable(ConfigError):
    """generation.backend=vllm without vLLM installed, or with settings vLLM cannot honour."""


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as e:
        raise VLLMUnavailable(
            "generation.backend=vllm needs vLLM: `pip install vllm` on a CUDA machine "
            "(or use generation.backend=loop / static)"
        ) from e
    return vllm


def _engine(vllm: Any, model: Any, tokenizer: Any) -> Any:
    """A vLLM engine serving `model`'s current weights (reused while they are unchanged)."""
    fingerprint = model_fingerprint(model)
    cached = _ENGINES.get(model)
    if cached is not None and cached[0] == fingerprint:
        return cached[1]
    release(model)
    folder = tempfile.TemporaryDirectory(prefix="srd-vllm-")
    model.save_pretrained(folder.name, safe_serialization=True)
    tokenizer.save_pretrained(folder.name)
    dtype = next(model.parameters()).dtype
    llm = vllm.LLM(
        model=folder.name,
        tokenizer=folder.name,
        dtype=dtype_name(dtype),
        gpu_memory_utilization=float(os.environ.get("SRD_VLLM_GPU_MEMORY", "0.5")),
    )
    _ENGINES[model] = (fingerprint, llm, folder)  # the folder lives as long as the engine
    return llm


def release(model: Any) -> None:
    """Drop the engine kept for `model` (its GPU memory returns when vLLM lets it go)."""
    cached = _ENGINES.pop(model, None)
    if cached is None:
        return
    _, llm, folder = cached
    del llm
    gc.collect()
    folder.cleanup()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def vllm_generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    d: Decoding,
    *,
    seeds: Sequence[int] | None,
    progress: bool = False,
) -> list[str]:
    """Answers (cut at the stop strings) for token-id prompts, decoded as `d` says, in input
    order; sampling gives prompt i the seed `seeds[i]`."""
    if d.no_repeat_ngram_size:
        raise VLLMUnavailable(
            f"vLLM has no no-repeat-n-gram rule (no_repeat_ngram_size={d.no_repeat_ngram_size}): set "
            "generation.no_repeat_ngram_size=0 (eval.no_repeat_ngram_size for evaluation) or use another backend"
        )
    vllm = _import_vllm()
    llm = _engine(vllm, model, tokenizer)

    def params(i: int) -> Any:
        return vllm.SamplingParams(
            n=1,
            temperature=d.temperature if d.do_sample else 0.0,  # 0: greedy
            top_k=d.top_k if (d.do_sample and d.top_k) else -1,  # -1: no top-k
            top_p=d.top_p if d.do_sample else 1.0,
            max_tokens=d.max_new_tokens,
            stop=list(d.stop_strings) or None,
            seed=int(seeds[i]) if (d.do_sample and seeds is not None) else None,
            skip_special_tokens=True,
        )

    requests = [{"prompt_token_ids": list(p)} for p in prompts]
    outputs = llm.generate(requests, [params(i) for i in range(len(prompts))], use_tqdm=progress)
    return [cut_at_stop(o.outputs[0].text, d.stop_strings) for o in outputs]
