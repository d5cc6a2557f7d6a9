"""Batched generation for reflection, dev evaluation and benchmarks.

Prompts are sorted by length so each batch pads little, left-padded (decoder-only
models continue from the right edge), and stopped at EOS and at template stop strings
(an Alpaca-prompted instruct model otherwise writes a new "### Instruction:").

Two backends with the same decoding rules:
  * `loop` (default): a KV-cached decode loop that drops a sequence from the batch (and
    its rows from the cache) as soon as it finishes, so a batch costs what its live rows
    cost, not what its longest row costs; only the last position's logits are computed.
    Logits processing (no-repeat n-grams, temperature, top-k, top-p) is transformers' own.
  * `hf`: plain `model.generate` (the reference point of benchmarks/generation.py).
  * `static`: `model.generate` with a static KV cache sized once for the whole call (the longest
    prompt + max_new_tokens) and every batch filled to the same size, so the decode step keeps
    one shape: on a GPU transformers then compiles it (torch.compile with CUDA graphs), which
    removes the per-token Python and kernel-launch overhead that dominates small models; on a
    CPU it runs uncompiled. Finished rows stay in the batch (the price of one shape).
  * `vllm`: vLLM's engine on a saved copy of the model (srd.eval.vllm_backend; GPU, optional).
Greedy decoding gives the same text with loop, hf and static (tested).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from srd.data.tokenize import pad_id
from srd.models.load import is_seq2seq


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """Text before the first stop string, stripped."""
    cut = len(text)
    for s in stop_strings:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut].strip()


class StopOnStrings:
    """Stop a sequence once its generated text contains a stop string.

    Decodes only the last `window` new tokens of each row per step: cheaper than
    transformers' StopStringCriteria, whose set-up over a 50k-150k vocabulary costs
    seconds per `generate` call on a CPU.
    """

    def __init__(self, tokenizer: Any, stop_strings: Sequence[str], prompt_len: int, window: int = 12) -> None:
        self.tokenizer, self.stop_strings = tokenizer, list(stop_strings)
        self.prompt_len, self.window = prompt_len, window

    def __call__(self, input_ids: torch.Tensor, scores: Any = None, **kwargs: Any) -> torch.Tensor:
        new = input_ids[:, self.prompt_len :]
        tails = self.tokenizer.batch_decode(new[:, -self.window :], skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stop_strings) for t in tails], device=input_ids.device)


_STOP_CANDIDATES: weakref.WeakKeyDictionary[Any, dict[tuple[str, ...], frozenset[int]]] = weakref.WeakKeyDictionary()


def stop_candidates(tokenizer: Any, stop_strings: Sequence[str]) -> frozenset[int]:
    """Ids of the tokens that can complete a stop string: their text holds a stop string's last
    character, or is not plain text on its own (an empty or partial-UTF-8 piece). A row whose new
    token is not one of them cannot have just written a stop string, so it is not decoded."""
    cached = _STOP_CANDIDATES.setdefault(tokenizer, {})
    key = tuple(stop_strings)
    if key not in cached:
        lasts = {s[-1] for s in stop_strings if s}
        texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=True)
        cached[key] = frozenset(i for i, t in enumerate(texts) if not t or "\ufffd" in t or any(c in t for c in lasts))
    return cached[key]


def length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt positions grouped into batches, longest prompts first (little padding per batch).
    generate_responses decodes in exactly these batches, so a caller resuming per batch can
    rebuild them."""
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def _left_pad(seqs: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids, mask


def logits_processors(do_sample: bool, temperature: float, top_k: int, top_p: float, no_repeat_ngram_size: int) -> Any:
    from transformers import (
        LogitsProcessorList,
        NoRepeatNGramLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    procs = LogitsProcessorList()
    if no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(no_repeat_ngram_size))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p))
    return procs


@torch.no_grad()
def decode_batch(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    do_sample: bool,
    processors: Any,
    stop_strings: Sequence[str],
    generator: torch.Generator | None,
    window: int = 12,
    keep_eos: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt (left-padded into one batch on the model's device);
    finished rows leave the batch and the KV cache.

    With `keep_eos` a generated EOS ends its row's ids (on-policy training keeps it as a target)."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    ids, mask = _left_pad(prompts, pad_id(tokenizer))
    ids, mask = ids.to(device), mask.to(device)
    n = ids.shape[0]
    eos = tokenizer.eos_token_id
    cache = DynamicCache(config=model.config)
    candidates = stop_candidates(tokenizer, stop_strings) if stop_strings else frozenset()
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1
    )
    live = list(range(n))  # original row of each live batch row
    new: list[list[int]] = [[] for _ in range(n)]
    seqs = ids  # prompt + generated ids of live rows (for the no-repeat n-gram processor)
    logits = out.logits[:, -1, :].float()
    for step in range(max_new_tokens):
        scores = processors(seqs, logits)
        if do_sample:
            probs = torch.softmax(scores, dim=-1)
            nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:
            nxt = scores.argmax(dim=-1)
        keep = []
        for r, tok in enumerate(nxt.tolist()):
            row = live[r]
            if tok == eos:
                if keep_eos:
                    new[row].append(tok)
                continue
            new[row].append(tok)
            if tok in candidates:
                tail = tokenizer.decode(new[row][-window:], skip_special_tokens=True)
                if any(s in tail for s in stop_strings):
                    continue
            keep.append(r)
        if not keep or step == max_new_tokens - 1:
            break
        if len(keep) < len(live):
            index = torch.tensor(keep, device=ids.device)
            cache.batch_select_indices(index)
            mask, seqs, nxt = mask[index], seqs[index], nxt[index]
            live = [live[r] for r in keep]
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        out = model(
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=(mask.sum(-1, keepdim=True) - 1),
            cache=cache,
            use_cache=True,
        )
        logits = out.logits[:, -1, :].float()
    return new


BACKENDS = ("loop", "hf", "static", "vllm")


@torch.no_grad()
def generate_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    no_repeat_ngram_size: int = 0,
    stop_strings: Sequence[str] = (),
    seed: int | None = None,
    progress: bool = False,
    desc: str = "generating",
    backend: str = "loop",
    static_cache_len: int | None = None,
) -> list[str]:
    """Responses (decoded, cut at stop strings) for token-id prompts, in input order.

    `static_cache_len` (static backend): the KV cache length to use in every call (e.g. the
    prompt limit + max_new_tokens), so that calls on different prompts reuse one compiled graph;
    grown when a call needs more."""
    if not prompts:
        return []
    if backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {backend!r}; use one of {', '.join(BACKENDS)}")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    batches = length_batches(prompts, batch_size)
    out: list[str] = [""] * len(prompts)
    seq2seq = is_seq2seq(model)
    if seq2seq:
        backend = "hf"  # the decode loop is for decoder-only models
    if backend == "vllm":
        from srd.eval.vllm_backend import vllm_generate

        out = vllm_generate(
            model,
            tokenizer,
            prompts,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            no_repeat_ngram_size=no_repeat_ngram_size,
            stop_strings=stop_strings,
            seed=seed,
            progress=progress,
        )
        model.train(was_training)
        return out
    if backend == "loop":
        processors = logits_processors(do_sample, temperature, top_k, top_p, no_repeat_ngram_size)
        generator = None
        if do_sample:
            generator = torch.Generator(device=device)
            generator.manual_seed(0 if seed is None else seed)
        for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
            new = decode_batch(
                model,
                tokenizer,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                do_sample=do_sample,
                processors=processors,
                stop_strings=stop_strings,
                generator=generator,
            )
            for row, i in enumerate(idx):
                out[i] = cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), stop_strings)
        model.train(was_training)
        return out
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        no_repeat_ngram_size=no_repeat_ngram_size or None,
    )
    if do_sample:
        kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
    else:  # keep the model's generation_config sampling defaults from warning/overriding
        kwargs.update(temperature=None, top_k=None, top_p=None)
    full = len(batches[0])
    if backend == "static":  # one cache size and one batch size for every batch: one compiled graph
        need = max(max(len(p) for p in prompts) + max_new_tokens, static_cache_len or 0)
        kwargs.update(cache_implementation="static", max_cache_len=-(-need // 64) * 64)
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        rows = [prompts[i] for i in idx]
        if backend == "static" and len(rows) < full:  # the last batch: filled with copies, dropped below
            rows += [rows[-1]] * (full - len(rows))
        ids, mask = _left_pad(rows, pad_id(tokenizer))
        criteria = []
        if stop_strings:
            from transformers import StoppingCriteriaList

            # an encoder-decoder's generated ids start with its decoder start token, not the prompt
            start = 1 if seq2seq else ids.shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, stop_strings, start)])
        gen = model.generate(
            input_ids=ids.to(device), attention_mask=mask.to(device), stopping_criteria=criteria, **kwargs
        )
        new = gen[:, 1:] if seq2seq else gen[:, ids.shape[1] :]
        for row, i in enumerate(idx):
            text = tokenizer.decode(new[row], skip_special_tokens=True)
            out[i] = cut_at_stop(text, stop_strings)
    model.train(was_training)
    return out
