"""Batched generation for reflection, dev evaluation and benchmarks.

Prompts are sorted by length so each batch pads little, left-padded (decoder-only
models continue from the right edge), and stopped at EOS and at template stop strings
(an Alpaca-prompted instruct model otherwise writes a new "### Instruction:").

Backends with the same decoding rules:
  * `loop` (default): a KV-cached decode loop with continuous batching: a sequence that
    finishes leaves the batch (and its rows leave the cache) at once, and waiting prompts are
    prefilled and join the running batch in its place, so the batch stays full until the
    prompts run out; only the last position's logits are computed. Responses are handed out
    as they finish (iter_responses), so callers can save each at once.
    Logits processing (no-repeat n-grams, temperature, top-k, top-p) is transformers' own.
  * `hf`: plain `model.generate` (the reference point of benchmarks/generation.py).
  * `static`: `model.generate` with a static KV cache sized once for the whole call (the longest
    prompt + max_new_tokens) and every batch filled to the same size, so the decode step keeps
    one shape: on a GPU transformers then compiles it (torch.compile with CUDA graphs), which
    removes the per-token Python and kernel-launch overhead that dominates small models; on a
    CPU it runs uncompiled. Finished rows stay in the batch (the price of one shape).
  * `vllm`: vLLM's engine on a saved copy of the model (srd.generation.vllm; GPU, optional).
Greedy decoding gives the same text with loop, hf and static (tested; batch composition
changes matmul shapes, so a near-tie between two tokens can rarely flip).

Sampling with the loop draws each prompt's tokens from its own counter-based stream
(`sample_rows`: a hash of the prompt's seed and the token's position), so a sampled answer
depends on the seed and the prompt alone: not on batch size, on the other prompts of the call,
on the number of processes, or on where an interrupted run resumed. vLLM gets the same
per-prompt seeds (its own sampler). `hf` and `static` draw from torch's global generator, so
their samples depend on how prompts were batched.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from srd.data.tokenize import pad_id
from srd.generation import vllm
from srd.generation.decoding import Decoding
from srd.generation.packed import decode_pass, is_packed, packed_linears
from srd.generation.stops import StopOnStrings, cut_at_stop, stop_candidates
from srd.models.load import is_seq2seq, splittable


def length_batches(prompts: Sequence[Sequence[int]], batch_size: int) -> list[list[int]]:
    """Prompt positions grouped into batches, longest prompts first (little padding per batch):
    the batches of the `hf` and `static` backends, and (as one batch) the queue order of the
    decode loop."""
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


def _pad_left(t: torch.Tensor, n: int, dim: int, value: int | float = 0) -> torch.Tensor:
    if n == 0:
        return t
    shape = list(t.shape)
    shape[dim] = n
    return torch.cat([t.new_full(shape, value), t], dim=dim)


ROOM = 64  # columns a decode cache grows by at once


@functools.cache
def _roomy_layer_class() -> type:
    """RoomyLayer, made on first use (transformers is imported only when decoding)."""
    from transformers.cache_utils import DynamicLayer

    class RoomyLayer(DynamicLayer):
        """A DynamicLayer whose keys and values are a window [start, end) of a buffer with spare
        columns after it. A decode step writes its column in place instead of copying the whole
        cache into a new tensor (DynamicLayer's torch.cat, 8% of a CPU decode step at batch 16; a
        copy per ROOM steps here). When rows leave the batch only the rows that fill their places
        are copied (fill_holes), and the loop's trim of leading padding only moves `start`.
        `keys`/`values` stay plain tensors of the cached length, so whatever reads or reassigns
        them works as with a DynamicLayer; a tensor assigned from outside simply starts a new
        buffer at the next update."""

        _view: torch.Tensor | None = None

        def _window(self) -> None:
            self.keys = self._kbuf[..., self._start : self._end, :]
            self.values = self._vbuf[..., self._start : self._end, :]
            self._view = self.keys

        def _mine(self) -> bool:
            return self._view is not None and self.keys is self._view

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            add = key_states.shape[-2]
            if not (self._mine() and self._end + add <= self._kbuf.shape[-2]):
                old_k, old_v = (self.keys, self.values) if self.keys.dim() == 4 else (None, None)
                n = 0 if old_k is None else old_k.shape[-2]
                shape = (*key_states.shape[:-2], n + add + ROOM, key_states.shape[-1])
                self._kbuf = key_states.new_empty(shape)
                self._vbuf = value_states.new_empty((*shape[:-1], value_states.shape[-1]))
                if old_k is not None:
                    self._kbuf[..., :n, :] = old_k
                    self._vbuf[..., :n, :] = old_v
                self._start, self._end = 0, n
            self._kbuf[..., self._end : self._end + add, :] = key_states
            self._vbuf[..., self._end : self._end + add, :] = value_states
            self._end += add
            self._window()
            return self.keys, self.values

        def batch_select_indices(self, indices: torch.Tensor) -> None:
            if not self._mine() or len(indices) > self._kbuf.shape[0]:  # (more rows than it has: copied)
                return super().batch_select_indices(indices)
            # only the rows whose place changes are copied (the right side is read whole before
            # anything is written, so any order is safe); the buffer then ends after the kept rows
            moved = [j for j, r in enumerate(indices.tolist()) if r != j]
            if moved:
                dst = torch.tensor(moved, device=indices.device)
                src = indices[dst]
                self._kbuf[dst] = self._kbuf[src]
                self._vbuf[dst] = self._vbuf[src]
            self._kbuf, self._vbuf = self._kbuf[: len(indices)], self._vbuf[: len(indices)]
            self._window()

        def drop_front(self, columns: int) -> None:
            """Forget the first `columns` cached positions (padding every row has)."""
            if self._mine():
                self._start += columns
                self._window()
            else:
                self.keys, self.values = self.keys[..., columns:, :], self.values[..., columns:, :]

    return RoomyLayer


def decode_cache(config: Any) -> Any:
    """A DynamicCache for the decode loop: its plain dynamic layers grow in place (RoomyLayer);
    sliding-window layers stay transformers' own."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    roomy = _roomy_layer_class()
    cache = DynamicCache(config=config)
    cache.layers = [roomy() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    return cache


def fill_holes(keep: list[int]) -> list[int]:
    """The batch rows to keep (ascending) in the order that moves the fewest: a kept row among
    the first len(keep) stays where it is, and the kept rows beyond fill the holes that finished
    rows left there. The decode cache then copies only those rows, not every row that stays."""
    k = len(keep)
    stay = {r for r in keep if r < k}
    tail = [r for r in keep if r >= k]
    return [j if j in stay else tail.pop() for j in range(k)]


def _mergeable(cache: Any) -> bool:
    """Rows can join a running batch only with plain dynamic layers (not sliding-window or
    static ones, whose columns are not one per position)."""
    from transformers.cache_utils import DynamicLayer

    plain = (DynamicLayer, _roomy_layer_class())
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) in plain and layer.is_initialized for layer in layers)


def _join(
    cache: Any, mask: torch.Tensor, seqs: torch.Tensor, other: Any, o_mask: torch.Tensor, o_seqs: torch.Tensor, pad: int
):
    """The rows of `other` (a freshly prefilled batch) appended to the running batch, both
    left-padded to the wider of the two; padded columns are masked out."""
    width = max(mask.shape[1], o_mask.shape[1])
    a, b = width - mask.shape[1], width - o_mask.shape[1]
    for mine, theirs in zip(cache.layers, other.layers):
        mine.keys = torch.cat([_pad_left(mine.keys, a, -2), _pad_left(theirs.keys, b, -2)], dim=0)
        mine.values = torch.cat([_pad_left(mine.values, a, -2), _pad_left(theirs.values, b, -2)], dim=0)
    mask = torch.cat([_pad_left(mask, a, 1), _pad_left(o_mask, b, 1)], dim=0)
    seqs = torch.cat([_pad_left(seqs, a, 1, pad), _pad_left(o_seqs, b, 1, pad)], dim=0)
    return mask, seqs


def _trim(cache: Any, mask: torch.Tensor, seqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop leading columns that are padding in every row (left by rows that finished)."""
    first = int(mask.any(0).int().argmax())
    if first == 0:
        return mask, seqs
    for layer in cache.layers:
        if hasattr(layer, "drop_front"):
            layer.drop_front(first)
        else:
            layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
    return mask[:, first:], seqs[:, first:]


def step_logits(model: Any, **inputs: Any) -> torch.Tensor:
    """(B, V) float32 logits at each row's last position, the KV cache updated in place.

    When the logits are a plain linear map of the last hidden state, the head runs as
    weight @ hidden.T: for the few rows of a decode step that GEMM was measured faster on a
    CPU than F.linear's (benchmarks/gemm.py)."""
    base = model.get_base_model() if hasattr(model, "peft_config") else model
    with decode_pass():  # packed layers (packed_linears) may serve these forwards
        if not splittable(base):
            return model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :].float()
        hidden = base.base_model(**inputs, use_cache=True).last_hidden_state[:, -1, :]
        head = base.get_output_embeddings()
        if is_packed(head):
            return head(hidden).float()
        logits = (head.weight @ hidden.T).T
        if head.bias is not None:
            logits = logits + head.bias
        return logits.float()


_M32 = 0xFFFFFFFF


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash (xor-shift-multiply rounds) of an int64 tensor of values below
    2**32. Both multipliers are below 2**31, so no product overflows int64."""
    x = x ^ (x >> 16)
    x = (x * 0x21F0AAAD) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & _M32
    return x ^ (x >> 15)


WORK_BLOCK = 1024  # rows: the most a resumed generation repeats


def work_blocks(n: int, rank: int = 0, world: int = 1, size: int | None = None) -> list[list[int]]:
    """Process `rank`'s share of rows 0..n-1: consecutive blocks of at most `size` rows (fewer
    where that gives every process a block), block b to process b % world.

    A block is the unit a caller generates as one stream and repeats whole when it was cut
    short. In bf16 a row's logits depend on the rows decoded beside it (from about the width of
    a 135M model), so a rerun that generated only the missing rows of a block would batch them
    differently and could answer some of them differently; a whole block, given the same
    rows in the same order, is batched the same and answers the same. The blocks depend on n
    and the process count only, so a resumed run with the same process count reproduces an
    uninterrupted one."""
    size = max(1, min(size or WORK_BLOCK, -(-n // max(1, world))))
    blocks = [list(range(start, min(n, start + size))) for start in range(0, n, size)]
    return blocks[rank::world]


def row_seeds(seed: int, n: int) -> list[int]:
    """n sampling seeds derived from `seed`: one per prompt (position i gets the i-th)."""
    rng = np.random.default_rng([seed & (2**64 - 1), 0x5EED])
    return [int(x) for x in rng.integers(0, 2**63 - 1, size=n)]


def seed_keys(seeds: Sequence[int]) -> torch.Tensor:
    """The 32-bit stream key (int64 tensor) of each 64-bit seed."""
    s = [int(v) & (2**64 - 1) for v in seeds]
    lo = torch.tensor([v & _M32 for v in s], dtype=torch.int64)
    hi = torch.tensor([v >> 32 for v in s], dtype=torch.int64)
    return _mix32(lo ^ _mix32(hi ^ 0x243F6A88))


def _mix32_i32(x: torch.Tensor) -> torch.Tensor:
    """`_mix32` on int32 tensors: products wrap modulo 2**32 (two's complement, as every CPU and
    GPU multiplies) and right shifts are made logical by masking, so the bits equal `_mix32`'s
    (tested); half the memory traffic of the int64 form, for the (rows x vocabulary) noise."""
    x = x ^ ((x >> 16) & 0xFFFF)
    x = x * 0x21F0AAAD
    x = x ^ ((x >> 15) & 0x1FFFF)
    x = x * 0x735A2D97
    return x ^ ((x >> 15) & 0x1FFFF)


def _as_i32(x: torch.Tensor) -> torch.Tensor:
    """int64 values in [0, 2**32) as the int32 tensor with the same bits."""
    return torch.where(x >= 2**31, x - 2**32, x).to(torch.int32)


_TOKEN_CODES: dict[tuple[int, str], torch.Tensor] = {}


def _token_codes(vocab: int, device: torch.device) -> torch.Tensor:
    key = (vocab, str(device))
    if key not in _TOKEN_CODES:
        codes = (torch.arange(vocab, dtype=torch.int64) * 0x9E3779B9 + 0x7F4A7C15) & _M32
        _TOKEN_CODES[key] = _as_i32(codes).to(device)
    return _TOKEN_CODES[key]


def row_noise(keys: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """(B, vocab) float32 uniforms in (0, 1): entry (r, j) is a hash of (keys[r], counters[r], j)
    alone, 23 bits, exact in float32 (never 0 or 1)."""
    row = _mix32(keys ^ _mix32((counters * 0x2545F491 + 0x6A09E667) & _M32))
    x = _mix32_i32(_as_i32(row)[:, None] ^ _token_codes(vocab, keys.device)[None, :])
    return (((x >> 9) & 0x7FFFFF).float() + 0.5) * 2.0**-23


def sample_rows(scores: torch.Tensor, keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """One token per row of (B, V) `scores` (processed logits; -inf = excluded), drawn from
    their softmax by the Gumbel-max race: argmax_j scores_j - log(-log u_j), with u from
    `row_noise(keys, counters)`. What row r draws depends on its own scores, key and counter
    alone, in one vectorised pass (no per-row generator calls). Unlike inverse-transform
    sampling, whose cumulative sums pass every rounding difference on to later tokens, a race
    only flips between near-tied candidates, so the logits' last-bit differences between batch
    shapes almost never change a draw (tested)."""
    gumbel = -torch.log(-torch.log(row_noise(keys, counters, scores.shape[-1])))
    return (scores.float() + gumbel).argmax(dim=-1)


@torch.no_grad()
def decode_stream(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    *,
    batch_size: int,
    max_new_tokens: int,
    do_sample: bool,
    processors: Any,
    stop_strings: Sequence[str],
    seeds: Sequence[int] | None = None,
    window: int = 12,
    keep_eos: bool = False,
    refill_at: int | None = None,
) -> Iterator[tuple[int, list[int]]]:
    """(prompt position, new token ids) for every prompt, in the order they finish.

    At most `batch_size` rows decode together, longest prompts first. A row that finishes
    leaves the batch and its KV cache at once; once `refill_at` slots are free (default a
    quarter of the batch), the next prompts are prefilled and join the running batch, so the
    batch stays full until the prompts run out (continuous batching). A step of 16 rows costs
    far less than 16 steps of 1 row (a decode step is bound by reading the weights, which a
    batch shares; benchmarks/gemm.py), so a full batch
    is what makes decoding fast. Sampling needs `seeds`, one per prompt: a prompt's draws come
    from its seed and the token's position alone (`sample_rows`), whatever rows it is decoded
    with. With `keep_eos` a generated EOS ends its row's ids (on-policy training keeps it as a
    target)."""
    if max_new_tokens <= 0:
        yield from ((i, []) for i in range(len(prompts)))
        return
    device = next(model.parameters()).device
    keys = None
    if do_sample:
        if seeds is None or len(seeds) != len(prompts):
            raise ValueError(
                f"sampling needs one seed per prompt: got {'no' if seeds is None else len(seeds)} seeds "
                f"for {len(prompts)} prompts"
            )
        keys = seed_keys(seeds).to(device)
    pad, eos = pad_id(tokenizer), tokenizer.eos_token_id
    candidates = stop_candidates(tokenizer, stop_strings) if stop_strings else frozenset()
    refill_at = max(1, batch_size // 4) if refill_at is None else max(1, refill_at)
    queue = deque(i for batch in length_batches(prompts, len(prompts)) for i in batch)
    live: list[int] = []  # prompt position of each batch row
    new: dict[int, list[int]] = {}
    cache: Any = None
    mask = seqs = logits = torch.empty(0)
    joinable = False
    while True:
        free = batch_size - len(live)
        if queue and (not live or (joinable and free >= min(refill_at, len(queue)))):
            take = [queue.popleft() for _ in range(min(free, len(queue)))]
            ids, m = _left_pad([prompts[i] for i in take], pad)
            ids, m = ids.to(device), m.to(device)
            fresh = decode_cache(model.config)
            fresh_logits = step_logits(
                model, input_ids=ids, attention_mask=m, position_ids=(m.cumsum(-1) - 1).clamp(min=0), cache=fresh
            )
            new.update((i, []) for i in take)
            if not live:
                cache, mask, seqs, logits, live = fresh, m, ids, fresh_logits, take
                joinable = _mergeable(cache)
            else:
                mask, seqs = _join(cache, mask, seqs, fresh, m, ids, pad)
                logits = torch.cat([logits, fresh_logits], dim=0)
                live = live + take
        if not live:
            return
        scores = processors(seqs, logits)
        if keys is not None:
            rows = torch.tensor(live, device=device)
            counters = torch.tensor([len(new[i]) for i in live], device=device)
            nxt = sample_rows(scores, keys[rows], counters)
        else:
            nxt = scores.argmax(dim=-1)
        keep, finished = [], []
        for r, tok in enumerate(nxt.tolist()):
            row = live[r]
            ids_row = new[row]
            if tok == eos:
                if keep_eos:
                    ids_row.append(tok)
                finished.append(row)
                continue
            ids_row.append(tok)
            if tok in candidates:
                tail = tokenizer.decode(ids_row[-window:], skip_special_tokens=True)
                if any(s in tail for s in stop_strings):
                    finished.append(row)
                    continue
            if len(ids_row) >= max_new_tokens:
                finished.append(row)
                continue
            keep.append(r)
        for row in finished:
            yield row, new.pop(row)
        if len(keep) < len(live):
            keep = fill_holes(keep)
            live = [live[r] for r in keep]
            if not live:
                cache = None
                continue
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, seqs, nxt = mask[index], seqs[index], nxt[index]
            if joinable:
                mask, seqs = _trim(cache, mask, seqs)
        mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
        seqs = torch.cat([seqs, nxt[:, None]], dim=1)
        logits = step_logits(
            model,
            input_ids=nxt[:, None],
            attention_mask=mask,
            position_ids=(mask.sum(-1, keepdim=True) - 1),
            cache=cache,
        )


# A backend yields (prompt position, answer) pairs for token-id prompts: fn(model, tokenizer,
# prompts, decoding, seeds, seed, progress, desc). `generation.backend` names one.
Backend = Callable[..., Iterator[tuple[int, str]]]
BACKENDS: dict[str, Backend] = {}


def register_backend(name: str) -> Callable[[Backend], Backend]:
    def add(fn: Backend) -> Backend:
        BACKENDS[name] = fn
        return fn

    return add


def generate_responses(
    model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], decoding: Decoding | None = None, **kwargs: Any
) -> list[str]:
    """Responses (decoded, cut at stop strings) for token-id prompts, in input order; the
    arguments are iter_responses'."""
    out: list[str] = [""] * len(prompts)
    for i, text in iter_responses(model, tokenizer, prompts, decoding, **kwargs):
        out[i] = text
    return out


def iter_responses(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    decoding: Decoding | None = None,
    *,
    seed: int | None = None,
    seeds: Sequence[int] | None = None,
    progress: bool = False,
    desc: str = "generating",
    **settings: Any,
) -> Iterator[tuple[int, str]]:
    """(prompt position, response) pairs as responses finish: one at a time with the decode
    loop (continuous batching), a batch at a time with `hf` / `static`, all at the end with
    `vllm`. A caller can save each one at once, so an interruption loses no finished answer.

    `decoding` says how; keyword `settings` are Decoding's fields (they build one, or change
    the one given).

    Sampling with `loop` or `vllm`: prompt i draws from `seeds[i]` (default
    `row_seeds(seed, len(prompts))[i]`); a caller that passes each prompt's own seed (e.g.
    derived from its row in the dataset) gets the same answer in any batch, process or rerun."""
    if decoding is None:
        decoding = Decoding(**settings)
    elif settings:
        decoding = dataclasses.replace(decoding, **settings)
    d = decoding
    if not prompts:
        return
    if d.backend not in BACKENDS:
        raise ValueError(f"unknown generation backend {d.backend!r}; use one of {', '.join(BACKENDS)}")
    was_training = model.training
    model.eval()
    if d.do_sample and seeds is None:
        seeds = row_seeds(0 if seed is None else seed, len(prompts))
    elif d.do_sample and len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: pass one seed per prompt")
    if is_seq2seq(model):  # the decode loop and static caches are for decoder-only models
        d = dataclasses.replace(d, backend="hf")
    try:
        # on a CPU in float32: each linear layer's weights packed once for this call (srd.generation.packed)
        with packed_linears(model, rows=d.batch_size) if d.backend != "vllm" else contextlib.nullcontext():
            yield from BACKENDS[d.backend](model, tokenizer, prompts, d, seeds, seed, progress, desc)
    finally:
        model.train(was_training)


@register_backend("loop")
def _loop_backend(
    model: Any, tokenizer: Any, prompts: Any, d: Decoding, seeds: Any, seed: Any, progress: bool, desc: str
) -> Iterator[tuple[int, str]]:
    """srd's decode loop with continuous batching (decode_stream)."""
    stream = decode_stream(
        model,
        tokenizer,
        prompts,
        batch_size=d.batch_size,
        max_new_tokens=d.max_new_tokens,
        do_sample=d.do_sample,
        processors=logits_processors(d.do_sample, d.temperature, d.top_k, d.top_p, d.no_repeat_ngram_size),
        stop_strings=d.stop_strings,
        seeds=seeds,
    )
    with tqdm(total=len(prompts), desc=desc, disable=not progress, unit="prompt") as bar:
        for i, ids in stream:
            bar.update(1)
            yield i, cut_at_stop(tokenizer.decode(ids, skip_special_tokens=True), d.stop_strings)


@register_backend("vllm")
def _vllm_backend(
    model: Any, tokenizer: Any, prompts: Any, d: Decoding, seeds: Any, seed: Any, progress: bool, desc: str
) -> Iterator[tuple[int, str]]:
    """vLLM's engine on a saved copy of the model (srd.generation.vllm)."""
    yield from enumerate(vllm.vllm_generate(model, tokenizer, prompts, d, seeds=seeds, progress=progress))


@register_backend("hf")
@register_backend("static")
def _generate_backend(
    model: Any, tokenizer: Any, prompts: Any, d: Decoding, seeds: Any, seed: Any, progress: bool, desc: str
) -> Iterator[tuple[int, str]]:
    """transformers' `generate`, batch by batch; `static`: one static KV-cache shape and one batch
    size for every batch (one compiled graph on a GPU). Samples from torch's global generator."""
    static, seq2seq = d.backend == "static", is_seq2seq(model)
    device = next(model.parameters()).device
    if seed is not None:
        torch.manual_seed(seed)
    kwargs: dict[str, Any] = dict(
        max_new_tokens=d.max_new_tokens,
        do_sample=d.do_sample,
        pad_token_id=pad_id(tokenizer),
        eos_token_id=tokenizer.eos_token_id,
        no_repeat_ngram_size=d.no_repeat_ngram_size or None,
    )
    if d.do_sample:
        kwargs.update(temperature=d.temperature, top_k=d.top_k or None, top_p=d.top_p)
    else:  # keep the model's generation_config sampling defaults from warning/overriding
        kwargs.update(temperature=None, top_k=None, top_p=None)
    batches = length_batches(prompts, d.batch_size)
    full = len(batches[0])
    if static:  # one cache size and one batch size for every batch: one compiled graph
        need = max(max(len(p) for p in prompts) + d.max_new_tokens, d.static_cache_len or 0)
        kwargs.update(cache_implementation="static", max_cache_len=-(-need // 64) * 64)
    for idx in tqdm(batches, desc=desc, disable=not progress, unit="batch"):
        rows = [prompts[i] for i in idx]
        if static and len(rows) < full:  # the last batch: filled with copies, dropped below
            rows += [rows[-1]] * (full - len(rows))
        ids, mask = _left_pad(rows, pad_id(tokenizer))
        criteria = []
        if d.stop_strings:
            from transformers import StoppingCriteriaList

            # an encoder-decoder's generated ids start with its decoder start token, not the prompt
            start = 1 if seq2seq else ids.shape[1]
            criteria = StoppingCriteriaList([StopOnStrings(tokenizer, d.stop_strings, start)])
        with decode_pass():
            gen = model.generate(
                input_ids=ids.to(device), attention_mask=mask.to(device), stopping_criteria=criteria, **kwargs
            )
        new = gen[:, 1:] if seq2seq else gen[:, ids.shape[1] :]
        for row, i in enumerate(idx):
            yield i, cut_at_stop(tokenizer.decode(new[row], skip_special_tokens=True), d.stop_strings)
