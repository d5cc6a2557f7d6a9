"""The decode loop (finished rows leave the batch) against transformers' generate."""

from __future__ import annotations

import pytest
import torch

import srd.generation.decode as gen
from srd.generation.decode import generate_responses
from tests.conftest import make_gpt2, make_llama


def _prompts(tokenizer):
    texts = [
        "Below is an instruction. ### Instruction: name a colour",
        "hi",
        "Write a short story about a cat and a dog who become friends",
        "2 + 2 =",
        "The capital of France is",
    ]
    return [tokenizer(t)["input_ids"] for t in texts]


@pytest.mark.parametrize("maker", [make_llama, make_gpt2])
@pytest.mark.parametrize("no_repeat", [0, 3])
def test_greedy_loop_equals_hf_generate(tokenizer, maker, no_repeat):
    model = maker(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    kwargs = dict(max_new_tokens=12, batch_size=3, no_repeat_ngram_size=no_repeat, stop_strings=["###"])
    loop = generate_responses(model, tokenizer, prompts, backend="loop", **kwargs)
    hf = generate_responses(model, tokenizer, prompts, backend="hf", **kwargs)
    assert loop == hf
    assert any(loop)  # something was generated
    # the static-cache path: one cache size, the last batch (2 prompts) filled to 3 and cut back
    static = generate_responses(model, tokenizer, prompts, backend="static", **kwargs)
    assert static == loop


def test_finished_rows_leave_the_batch(tokenizer, monkeypatch):
    """A row that hits EOS at once stops costing forward passes; the others go on."""
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] *= 0  # EOS never wins by itself ...
    prompts = _prompts(tokenizer)[:3]
    widths = []
    real = gen.step_logits

    def step_logits(model, **inputs):
        widths.append(inputs["input_ids"].shape[0])
        logits = real(model, **inputs)
        if len(widths) == 1:  # ... except for row 0 of the first step (the longest prompt, sorted first)
            logits[0, :] = -1e9
            logits[0, eos] = 0.0
        return logits

    monkeypatch.setattr(gen, "step_logits", step_logits)
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=3)
    assert widths == [3, 2, 2, 2, 2]  # prefill with 3 rows, then 2 live rows for 4 more tokens
    assert sum(t == "" for t in texts) == 1


def test_sampling_is_seeded(tokenizer):
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    kw = dict(max_new_tokens=10, batch_size=2, do_sample=True, top_k=0, top_p=1.0)
    a = generate_responses(model, tokenizer, prompts, seed=10, **kw)
    b = generate_responses(model, tokenizer, prompts, seed=10, **kw)
    c = generate_responses(model, tokenizer, prompts, seed=20, **kw)
    assert a == b and a != c


def test_a_sampled_answer_depends_on_its_seed_alone(tokenizer):
    """Sampling with the loop: a prompt's answer is the same whatever the batch size and
    whatever other prompts share the call, given the same per-prompt seed."""
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    kw = dict(max_new_tokens=10, do_sample=True, top_k=0, top_p=1.0)
    seeds = gen.row_seeds(10, len(prompts))
    together = generate_responses(model, tokenizer, prompts, seeds=seeds, batch_size=3, **kw)
    assert together == generate_responses(model, tokenizer, prompts, seed=10, batch_size=3, **kw)
    assert together == generate_responses(model, tokenizer, prompts, seeds=seeds, batch_size=1, **kw)
    subset = [4, 1]
    alone = generate_responses(model, tokenizer, [prompts[i] for i in subset], seeds=[seeds[i] for i in subset], **kw)
    assert alone == [together[i] for i in subset]
    with pytest.raises(ValueError, match="2 seeds for 5 prompts"):
        generate_responses(model, tokenizer, prompts, seeds=seeds[:2], **kw)


def test_sample_rows_draws_from_the_softmax():
    """Counter-based Gumbel-max sampling: frequencies match softmax(scores) (a chi-square test
    with fixed keys, so it is deterministic), excluded tokens (-inf) are never drawn, and a draw
    is a function of (key, counter) alone."""
    from scipy.stats import chisquare

    scores = torch.tensor([0.0, 1.0, 2.0, -1.0, float("-inf"), 0.5])
    probs = torch.softmax(scores.double(), -1)
    n = 60_000
    keys = gen.seed_keys(gen.row_seeds(1, 300)).repeat_interleave(n // 300)
    counters = torch.arange(n // 300).repeat(300)
    drawn = gen.sample_rows(scores.expand(n, -1), keys, counters)
    counts = torch.bincount(drawn, minlength=6).double()
    assert counts[4] == 0
    live = [0, 1, 2, 3, 5]
    expected = probs[live] / probs[live].sum() * n
    assert chisquare(counts[live].numpy(), expected.numpy()).pvalue > 1e-3
    again = gen.sample_rows(scores.expand(n, -1), keys, counters)
    assert torch.equal(drawn, again)
    half = gen.sample_rows(scores.expand(n // 2, -1), keys[n // 2 :], counters[n // 2 :])
    assert torch.equal(half, drawn[n // 2 :])  # rows do not see each other
    u = gen.row_noise(keys[:2000], counters[:2000], 6)
    assert 0 < float(u.min()) and float(u.max()) < 1


def test_the_int32_hash_has_the_int64_hash_bits():
    """The noise's int32 hash (wrapping products, masked shifts) equals the overflow-free int64
    one bit for bit, including values with the top bit set."""
    x = torch.cat(
        [
            torch.randint(0, 2**32, (10_000,), generator=torch.Generator().manual_seed(0)),
            torch.tensor([0, 2**31, 2**32 - 1]),
        ]
    )
    fast = gen._mix32_i32(gen._as_i32(x)).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(fast, gen._mix32(x))


def test_a_draw_survives_last_bit_differences_in_the_logits():
    """Batch shapes change the logits in their last bits; a draw must not change with them
    (with inverse-transform sampling, 3 of 32 on-policy answers of the bundled model differed
    between batch sizes: benchmarks/results/2026-11-28-cpu-onpolicy.md)."""
    g = torch.Generator().manual_seed(0)
    n, vocab = 2000, 49152
    logits = 3 * torch.randn(1, vocab, generator=g)
    nudged = logits + 1e-5 * torch.randn(1, vocab, generator=g)
    keys, counters = gen.seed_keys(gen.row_seeds(0, n)), torch.zeros(n, dtype=torch.long)
    a = torch.cat(
        [gen.sample_rows(logits.expand(100, -1), keys[i : i + 100], counters[i : i + 100]) for i in range(0, n, 100)]
    )
    b = torch.cat(
        [gen.sample_rows(nudged.expand(100, -1), keys[i : i + 100], counters[i : i + 100]) for i in range(0, n, 100)]
    )
    assert int((a != b).sum()) <= 2


class _FakeVLLM:
    """Stands in for the `vllm` package: an engine that loads the saved folder with transformers
    and decodes greedily with srd's loop, recording what it was given."""

    def __init__(self):
        import types

        self.engines, self.calls = [], []
        fake = self

        class SamplingParams:
            def __init__(self, **kw):
                self.kw = kw

        class LLM:
            def __init__(self, model, tokenizer, **kw):
                from transformers import AutoModelForCausalLM, AutoTokenizer

                fake.engines.append({"model": model, **kw})
                self.model = AutoModelForCausalLM.from_pretrained(model).eval()
                self.tok = AutoTokenizer.from_pretrained(tokenizer)

            def generate(self, requests, params, use_tqdm=False):
                fake.calls.append([p.kw for p in params])
                out = []
                for r, p in zip(requests, params):
                    text = generate_responses(
                        self.model, self.tok, [r["prompt_token_ids"]], max_new_tokens=p.kw["max_tokens"]
                    )[0]
                    out.append(types.SimpleNamespace(outputs=[types.SimpleNamespace(text=text + " ### more")]))
                return out

        self.module = types.SimpleNamespace(LLM=LLM, SamplingParams=SamplingParams)


def test_vllm_backend_maps_settings_and_reuses_its_engine(tokenizer, tmp_path, monkeypatch):
    """generation.backend=vllm: prompts go in as token ids in order, greedy/sampling settings map
    onto SamplingParams, answers are cut at the stop strings, one engine serves calls while the
    weights are unchanged and a new one starts when they change; no-repeat n-grams are refused,
    and a missing vLLM names the fix. (vLLM needs CUDA: a stand-in engine here.)"""
    import sys

    from srd.generation import vllm as vllm_backend

    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    prompts = _prompts(tokenizer)
    monkeypatch.setitem(sys.modules, "vllm", None)  # not installed
    with pytest.raises(vllm_backend.VLLMUnavailable, match="pip install vllm"):
        generate_responses(model, tokenizer, prompts, max_new_tokens=8, backend="vllm")
    fake = _FakeVLLM()
    monkeypatch.setitem(sys.modules, "vllm", fake.module)
    kw = dict(max_new_tokens=8, stop_strings=["###"])
    loop = generate_responses(model, tokenizer, prompts, backend="loop", **kw)
    assert generate_responses(model, tokenizer, prompts, backend="vllm", **kw) == loop
    assert fake.calls[-1][0] == {
        "n": 1,
        "temperature": 0.0,
        "top_k": -1,
        "top_p": 1.0,
        "max_tokens": 8,
        "stop": ["###"],
        "seed": None,
        "skip_special_tokens": True,
    }
    sampled = generate_responses(
        model, tokenizer, prompts, backend="vllm", do_sample=True, top_k=5, top_p=0.9, temperature=0.7, seed=3, **kw
    )
    assert len(sampled) == len(prompts) and all("###" not in s for s in sampled)
    assert [(p["temperature"], p["top_k"], p["top_p"], p["seed"]) for p in fake.calls[-1]] == [
        (0.7, 5, 0.9, s) for s in gen.row_seeds(3, len(prompts))
    ]
    assert len(fake.engines) == 1 and fake.engines[0]["dtype"] == "float32"  # reused while the weights hold
    with torch.no_grad():
        next(model.parameters()).add_(0.5)
    generate_responses(model, tokenizer, prompts[:1], backend="vllm", **kw)
    assert len(fake.engines) == 2  # new weights: a new engine on a new saved copy
    with pytest.raises(vllm_backend.VLLMUnavailable, match="no_repeat_ngram_size"):
        generate_responses(model, tokenizer, prompts, backend="vllm", no_repeat_ngram_size=3, **kw)
    folder = vllm_backend._ENGINES[model][2].name
    vllm_backend.release(model)
    assert model not in vllm_backend._ENGINES and not __import__("os").path.exists(folder)


def test_waiting_prompts_join_the_running_batch(tokenizer, monkeypatch):
    """Continuous batching: when a row finishes, the next prompt is prefilled and joins the
    batch still decoding; padding columns no row needs are dropped; greedy text is what each
    prompt gives alone."""
    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        model.lm_head.weight[eos] *= 0
    prompts = _prompts(tokenizer)[:3]
    alone = [generate_responses(model, tokenizer, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    calls = []
    real = gen.step_logits

    def step_logits(model, **inputs):
        calls.append((inputs["input_ids"].shape[0], inputs["input_ids"].shape[1], inputs["attention_mask"].shape[1]))
        logits = real(model, **inputs)
        if len(calls) == 1:  # the longest prompt (row 0 of the first batch) ends at once
            logits[0, :] = -1e9
            logits[0, eos] = 0.0
        return logits

    monkeypatch.setattr(gen, "step_logits", step_logits)
    texts = generate_responses(model, tokenizer, prompts, max_new_tokens=5, batch_size=2)
    lens = sorted((len(p) for p in prompts), reverse=True)
    rows = [c[0] for c in calls]
    # prefill 2, the survivor decodes alone once, the third prompt is prefilled (1 row), then 2 rows decode
    assert rows[:4] == [2, 1, 1, 2] and calls[2][1] == lens[2]
    # after the longest prompt left, the survivor's cache needs only its own prompt + 1 token
    assert calls[1][2] == lens[1] + 1
    first = max(range(3), key=lambda i: len(prompts[i]))
    assert texts[first] == "" and [t for i, t in enumerate(texts) if i != first] == [
        t for i, t in enumerate(alone) if i != first
    ]
    assert all(alone)


def test_every_configurable_backend_is_registered():
    """generation.backend's values and the registry of decoding implementations are the same set."""
    from srd.config import GENERATION_BACKENDS
    from srd.generation.decode import BACKENDS

    assert set(GENERATION_BACKENDS) == set(BACKENDS)


@pytest.mark.parametrize("room", [2, 64])
def test_the_decode_cache_growing_in_place_gives_the_plain_caches_logits(tokenizer, monkeypatch, room):
    """The loop's cache writes each step's column into spare room (and keeps it through rows
    leaving, rows joining and the trim of shared padding) instead of concatenating: every step's
    logits and every answer must be what transformers' own DynamicCache gives, with the room
    running out and refilled many times (room 2) or seldom (64)."""
    from transformers import DynamicCache

    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    eos = tokenizer.eos_token_id
    rng = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, len(tokenizer), (int(n),), generator=rng).tolist() for n in torch.randint(2, 14, (11,))]
    kwargs = dict(max_new_tokens=9, batch_size=4, no_repeat_ngram_size=0)
    real = gen.step_logits

    def run(cache_factory):
        seen = []

        def step_logits(model, **inputs):
            out = real(model, **inputs)
            seen.append(out.clone())
            # rows end at different steps, the longest prompts' too (then the others' padding is trimmed)
            ends = inputs["input_ids"][:, -1] % 3 == 0
            out[ends] = -1e9
            out[ends, eos] = 0.0
            return out

        monkeypatch.setattr(gen, "step_logits", step_logits)
        monkeypatch.setattr(gen, "decode_cache", cache_factory)
        texts = generate_responses(model, tokenizer, prompts, **kwargs)
        return texts, seen

    monkeypatch.setattr(gen, "ROOM", room)
    reused = []
    layer_class = type(gen.decode_cache(model.config).layers[0])
    real_update = layer_class.update

    def update(self, k, v, *a, **kw):
        before = getattr(self, "_kbuf", None)
        out = real_update(self, k, v, *a, **kw)
        reused.append(before is self._kbuf)
        return out

    monkeypatch.setattr(layer_class, "update", update)
    trims = []
    real_drop = layer_class.drop_front

    def drop_front(self, columns):
        trims.append(columns)
        return real_drop(self, columns)

    monkeypatch.setattr(layer_class, "drop_front", drop_front)
    roomy, roomy_logits = run(gen.decode_cache)
    plain, plain_logits = run(lambda config: DynamicCache(config=config))
    assert roomy == plain and any(roomy)
    assert len(roomy_logits) == len(plain_logits) > len(prompts)
    for a, b in zip(roomy_logits, plain_logits):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert any(reused) and not all(reused)  # columns written in place, and new buffers when needed
    assert trims and all(n > 0 for n in trims)


def test_fill_holes_moves_only_the_rows_that_fill_finished_ones():
    assert gen.fill_holes([0, 1, 2]) == [0, 1, 2]
    assert gen.fill_holes([0, 2, 3, 5]) == [0, 5, 2, 3]  # row 1 finished: row 5 takes its place
    assert gen.fill_holes([3, 4]) == [4, 3]
    assert gen.fill_holes([]) == []
    for keep in ([1, 2, 4, 6, 7], [0, 3, 5, 6]):
        order = gen.fill_holes(keep)
        assert sorted(order) == keep and all(r == j or r >= len(keep) for j, r in enumerate(order))


@pytest.mark.parametrize("order", [[0, 5, 2, 3], [2, 0, 1], [3, 3, 1], [1, 1, 0, 2, 3, 4, 5, 0]])
def test_the_decode_cache_selects_rows_as_a_dynamic_cache_does(order):
    """Any row selection (the loop's hole filling, or an arbitrary one, repeats included) leaves
    the growing cache holding what transformers' DynamicLayer holds, before and after more steps."""
    from transformers.cache_utils import DynamicLayer

    plain = DynamicLayer()
    roomy = type(gen.decode_cache(make_llama(40, layers=1).config).layers[0])()
    g = torch.Generator().manual_seed(0)
    for n in (5, 1, 1):
        k, v = torch.randn(6, 2, n, 4, generator=g), torch.randn(6, 2, n, 4, generator=g)
        roomy.update(k, v)
        plain.update(k, v)
    roomy.drop_front(2)
    plain.keys, plain.values = plain.keys[..., 2:, :], plain.values[..., 2:, :]
    index = torch.tensor(order)
    roomy.batch_select_indices(index)
    plain.batch_select_indices(index)
    for _ in range(2):
        k, v = torch.randn(len(order), 2, 1, 4, generator=g), torch.randn(len(order), 2, 1, 4, generator=g)
        got, want = roomy.update(k, v), plain.update(k, v)
        for a, b in zip(got, want):
            assert torch.equal(a, b)


packed_ops = pytest.mark.skipif(
    not __import__("srd.generation.packed", fromlist=["_ops_available"])._ops_available(),
    reason="this torch has no oneDNN linear",
)


@packed_ops
def test_packed_layers_serve_only_decoding_passes_and_give_the_plain_products(tokenizer, monkeypatch):
    """Inside packed_linears, a decode_pass without gradients runs every plain nn.Linear through
    its packed weights (the same product within float32 rounding); any other forward, or one with
    gradients, runs the layer as it is, bit for bit; the layers are themselves again after."""
    from srd.generation.packed import decode_pass, is_packed, packed_linears

    model = make_llama(len(tokenizer), layers=2, seed=5).eval()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    x = torch.randn(3, 5, 64)
    q = layers[0]
    with torch.no_grad():
        plain = q(x)
        with packed_linears(model) as on:
            assert on and all(is_packed(m) for m in layers)
            assert torch.equal(q(x), plain)  # not a decoding pass
            with decode_pass():
                fast = q(x)
                head = model.lm_head(x)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(head, model.lm_head(x), rtol=1e-5, atol=1e-5)
    with packed_linears(model), decode_pass():  # gradients: the plain layer, which autograd can follow
        y = q(x.requires_grad_())
        assert y.grad_fn is not None and torch.equal(y.detach(), plain)
    assert not any("forward" in vars(m) for m in layers)
    # where it does not apply: another precision, switched off, or too little memory for the copies
    import srd.generation.packed as packed

    mixed = make_llama(len(tokenizer), layers=1)
    mixed.lm_head.to(torch.bfloat16)
    with packed_linears(mixed) as on:
        assert not on
    with packed_linears(make_llama(len(tokenizer), layers=1).to(torch.float16)) as on:
        assert not on
    with packed_linears(make_llama(len(tokenizer), layers=1).to(torch.bfloat16)) as on:
        assert on == torch.ops.mkldnn._is_mkldnn_bf16_supported()  # bf16: only in hardware
    monkeypatch.setenv("SRD_CPU_PACKED", "0")
    with packed_linears(model) as on:
        assert not on
    monkeypatch.delenv("SRD_CPU_PACKED")
    monkeypatch.setattr(packed, "_available_bytes", lambda: 4 * 1024)
    with packed_linears(model) as on:
        assert not on and not any("forward" in vars(m) for m in layers)


@packed_ops
@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 in hardware")
def test_bf16_packed_layers_give_the_plain_products():
    """On a CPU with bf16 in hardware a bfloat16 model's layers are packed too, and their decoding
    products are the plain layer's: both are oneDNN's bf16 product."""
    from srd.generation.packed import decode_pass, is_packed, packed_linears

    model = make_llama(512, layers=1, seed=3).to(torch.bfloat16).eval()
    layers = [m for m in model.modules() if type(m) is torch.nn.Linear]
    inputs = [torch.randn(16, 1, m.in_features, dtype=torch.bfloat16) for m in layers]
    with torch.no_grad():
        plain = [m(x) for m, x in zip(layers, inputs)]
        with packed_linears(model) as on, decode_pass():
            assert on and all(is_packed(m) for m in layers)
            fast = [m(x) for m, x in zip(layers, inputs)]
    for got, want in zip(fast, plain):
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got, want)


@packed_ops
@pytest.mark.parametrize("backend, dtype", [("loop", torch.float32), ("hf", torch.float32), ("loop", torch.bfloat16)])
def test_greedy_answers_with_packed_layers_are_the_plain_layers_answers(tokenizer, monkeypatch, backend, dtype):
    import contextlib

    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        pytest.skip("this CPU has no bf16 in hardware")
    model = make_llama(len(tokenizer), layers=2, seed=5).to(dtype).eval()
    kwargs = dict(max_new_tokens=12, batch_size=3, no_repeat_ngram_size=3, stop_strings=["###"], backend=backend)
    used, real = [], gen.packed_linears

    @contextlib.contextmanager
    def spy(model, rows=16):
        with real(model, rows) as on:
            used.append(on)
            yield on

    monkeypatch.setattr(gen, "packed_linears", spy)
    packed_answers = generate_responses(model, tokenizer, _prompts(tokenizer), **kwargs)
    monkeypatch.setenv("SRD_CPU_PACKED", "0")
    plain_answers = generate_responses(model, tokenizer, _prompts(tokenizer), **kwargs)
    assert used == [True, False] and any(packed_answers) and packed_answers == plain_answers
