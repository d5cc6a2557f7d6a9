"""Models: depth pruning, layer skipping, tokenizer checks, vocab alignment, resolution errors."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from srd.models import (
    ModelError,
    aligned_vocab_size,
    build_pruned,
    check_tokenizers,
    choose_layers,
    decoder_layers,
    load_model,
    perplexity,
    resolve_model_path,
    skip_layers,
)
from tests.conftest import make_gpt2, make_llama


def _batch(tok):
    ids = torch.tensor([tok("The moon is dark. The sun is bright. Paris is the capital.")["input_ids"]])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


@pytest.mark.parametrize("maker", [make_llama, make_gpt2])
def test_pruned_model_equals_layer_skipping(tokenizer, maker):
    model = maker(len(tokenizer), layers=4, seed=0).eval()
    batch = _batch(tokenizer)
    keep = [0, 2, 3]
    student = build_pruned(model, keep).eval()
    assert len(decoder_layers(student)[1]) == 3 and student.config.num_hidden_layers == 3
    with torch.no_grad(), skip_layers(model, keep):
        want = model(input_ids=batch["input_ids"], use_cache=False).logits
    got = student(input_ids=batch["input_ids"], use_cache=False).logits
    torch.testing.assert_close(got, want)
    # the teacher is restored after skipping
    assert len(decoder_layers(model)[1]) == 4 and model.config.num_hidden_layers == 4
    # the student still generates with its KV cache (layer indices renumbered)
    out = student.generate(input_ids=batch["input_ids"][:, :5], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape[1] == 8


def test_build_pruned_rejects_bad_layers(tokenizer):
    model = make_llama(len(tokenizer), layers=3)
    for keep in ([], [0, 3], [1, 1]):
        with pytest.raises(ValueError, match="distinct indices"):
            build_pruned(model, keep)


@pytest.mark.parametrize("method", ["greedy", "oneshot"])
def test_choose_layers_measures_perplexity(tokenizer, method):
    model = make_llama(len(tokenizer), layers=4, seed=0)
    batches = [_batch(tokenizer)]
    res = choose_layers(model, batches, 2, method=method, candidates=2, progress=False)
    assert len(res.keep) == 2 and res.keep == sorted(res.keep)
    with skip_layers(model, res.keep):
        assert perplexity(model, batches) == pytest.approx(res.perplexity, rel=1e-5)
    assert set(res.single_layer) == {0, 1, 2, 3}
    if method == "greedy":
        assert [t["layers"] for t in res.trace] == [3, 2]


def test_tokenizer_check(tokenizer):
    check_tokenizers(tokenizer, tokenizer)
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tests.conftest import CORPUS

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"]))
    other = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_tokenizers(tokenizer, other)


def test_aligned_vocab_slices_padded_rows(tokenizer):
    padded = make_llama(len(tokenizer) + 11)  # like Qwen's padded embedding matrices
    exact = make_llama(len(tokenizer))
    assert aligned_vocab_size(tokenizer, padded, exact) == len(tokenizer)
    with pytest.raises(ModelError, match="do not belong together"):
        aligned_vocab_size(tokenizer, make_llama(len(tokenizer) - 5))


def test_resolve_model_paths(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths below are looked up here, not in a checkout's runs/
    assert resolve_model_path(str(tiny_models["llama-student"])) == str(tiny_models["llama-student"])
    assert resolve_model_path("someorg/some-model") == "someorg/some-model"
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(str(tmp_path))
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model_path("./nope")
    assert resolve_model_path("gpt2") == "gpt2"  # a Hub id without a namespace
    # a relative path that is not on disk and cannot be a Hub id (two slashes): a missing folder,
    # with the command that builds it when a shipped recipe names it, never a Hub lookup
    with pytest.raises(ModelError, match=r"runs/students/smollm2-20l-healed does not exist; build it with: srd prune"):
        resolve_model_path("runs/students/smollm2-20l-healed")
    with pytest.raises(ModelError, match="does not exist; check the path"):
        resolve_model_path("runs/students/nothing")
    assert load_model(str(tiny_models["gpt2-student"])).config.n_layer == 2


def test_random_init_shapes(tokenizer):
    """random:<shape> builds the real architecture (GPT-2 1.5B / 124M for timing runs), seeded."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from srd.models.load import RANDOM_SHAPES, ModelError, random_model

    a = random_model("random:gpt2", tokenizer, seed=3)
    b = random_model("random:gpt2", tokenizer, seed=3)
    assert a.config.n_layer == 12 and a.config.n_embd == 768 and a.config.vocab_size == len(tokenizer)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))
    model_type, kwargs = RANDOM_SHAPES["gpt2-xl"]
    with torch.device("meta"):
        xl = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, vocab_size=50257, **kwargs))
    assert round(sum(p.numel() for p in xl.parameters()) / 1e9, 2) == 1.56  # GPT-2 XL
    with pytest.raises(ModelError, match="gpt2-xl"):
        random_model("random:gpt5", tokenizer)


def test_prune_then_heal_cli(tmp_path, tiny_models, tiny_data, monkeypatch, capsys):
    """srd prune --heal-steps: pruned student kept in <out>/pruned, healed by KD on other data into
    <out>, perplexity before/after recorded, cached on rerun, other settings refused."""
    from safetensors.torch import load_file

    from srd.cli import main

    other = tmp_path / "other.jsonl"
    other.write_text(tiny_data["dev"].read_text().replace('"instruction": "', '"instruction": "Other: '))
    out = tmp_path / "student"
    args = [
        "prune",
        "--teacher",
        str(tiny_models["llama-teacher"]),
        "--layers",
        "2",
        "--out",
        str(out),
        "--data",
        str(tiny_data["train"]),
        "--num-texts",
        "4",
        "--max-len",
        "128",
        "--heal-steps",
        "3",
        "--heal-data",
        str(tiny_data["train"]),
        str(other),
        "--heal-batch-size",
        "2",
    ]
    assert main(args) == 0
    report = json.loads((out / "prune.json").read_text())
    assert report["heal"]["steps"] == 3 and report["request"]["heal_steps"] == 3
    assert report["pruned_perplexity"] == json.loads((out / "pruned" / "prune.json").read_text())["student_perplexity"]
    assert report["student_perplexity"] != report["pruned_perplexity"]
    healed, pruned = load_file(out / "model.safetensors"), load_file(out / "pruned" / "model.safetensors")
    assert set(healed) == set(pruned) and any(not torch.equal(healed[k], pruned[k]) for k in healed)
    assert load_model(str(out)).config.num_hidden_layers == 2
    assert "healed student" in capsys.readouterr().out

    def no_training(*a, **k):
        raise AssertionError("a cached healed student was retrained")

    monkeypatch.setattr("srd.recipes.heal.train_stage", no_training)
    assert main(args) == 0  # cached
    # the same request as a recipe (the model and prune sections) and key=value overrides: the
    # flags are aliases of these keys, so the cached student is found again
    recipe = tmp_path / "prune.yaml"
    prune = {"layers": 2, "data": str(tiny_data["train"]), "num_texts": 4, "max_len": 128, "heal_steps": 3}
    prune.update(heal_data=[str(tiny_data["train"]), str(other)])
    model = {"teacher": str(tiny_models["llama-teacher"]), "student": str(out)}
    recipe.write_text(yaml.safe_dump({"model": model, "prune": prune}))
    assert main(["prune", str(recipe), "prune.heal_batch_size=2"]) == 0
    assert main(["prune", "-", f"model.teacher={tiny_models['llama-teacher']}", f"model.student={out}"]) == 2
    assert "prune.layers=N (--layers N)" in capsys.readouterr().err
    assert main(["prune", str(recipe), "prune.heal_batch_size=4"]) == 2  # another request into the same folder
    assert "other settings" in capsys.readouterr().err
    args[args.index("--heal-steps") + 1] = "4"
    assert main(args) == 2
    assert "other settings" in capsys.readouterr().err


def test_cast_for_inference_casts_and_puts_the_weights_back(tokenizer):
    """Inside: every floating parameter in bf16 (a tied head cast once, with the embedding),
    buffers untouched, logits close to float32's; after: the very same float32 tensors."""
    from srd.models.load import cast_for_inference, inference_dtype_of

    model = make_llama(len(tokenizer), layers=2, seed=3).eval()
    model.config.tie_word_embeddings = True
    model.tie_weights()
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    copies = {n: p.detach().clone() for n, p in model.named_parameters()}
    buffers = {n: b.dtype for n, b in model.named_buffers()}
    ids = torch.tensor([tokenizer("The moon is dark. The sun is bright.")["input_ids"]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        with cast_for_inference(model, torch.bfloat16) as cast:
            assert cast is model and all(p.dtype == torch.bfloat16 for p in model.parameters())
            assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
            assert {n: b.dtype for n, b in model.named_buffers()} == buffers
            low = model(input_ids=ids).logits.float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() and not torch.equal(low, ref)
    for n, p in model.named_parameters():
        assert p.data_ptr() == before[n] and torch.equal(p, copies[n]) and p.dtype == torch.float32
    with cast_for_inference(model, torch.float32):  # nothing to cast: the model as it is
        assert all(p.data_ptr() == before[n] for n, p in model.named_parameters())
    assert inference_dtype_of("auto", bf16_training=True) == torch.bfloat16
    assert inference_dtype_of("auto", bf16_training=False) == torch.float32
    assert inference_dtype_of("bfloat16", bf16_training=False) == torch.bfloat16


def test_a_hub_model_is_checked_once_before_any_run_folder_is_written(monkeypatch):
    """A Hub id passes when its config is in the local cache or the Hub knows it; otherwise one
    line says why (unknown, gated, unreachable), after one request, not a download's retries."""
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    from srd.models.load import ModelError, check_hub_model

    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)

    def answer(error):
        def model_info(repo, timeout):
            asked.append((repo, timeout))
            if error is not None:
                raise error

        return model_info

    monkeypatch.setattr(huggingface_hub, "model_info", answer(None))
    check_hub_model("org/known")
    for error, words in [
        (_hub_error(RepositoryNotFoundError), "not a model on the Hugging Face Hub"),
        (_hub_error(GatedRepoError), "gated"),
        (ConnectionError("offline"), "cannot be reached"),
    ]:
        monkeypatch.setattr(huggingface_hub, "model_info", answer(error))
        with pytest.raises(ModelError, match=words):
            check_hub_model("org/x")
    assert len(asked) == 4 and all(t == 10 for _, t in asked)
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: "/cache/config.json")
    monkeypatch.setattr(huggingface_hub, "model_info", answer(AssertionError("the cache answers first")))
    check_hub_model("org/cached")
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo, name: None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE"):
        check_hub_model("org/x")


def _hub_error(cls):
    """A huggingface_hub HTTP error as model_info raises it (built without an HTTP response)."""
    error = cls.__new__(cls)
    Exception.__init__(error, cls.__name__)
    return error


def test_a_model_cast_to_bf16_keeps_its_rotary_frequencies_in_float32(tiny_models):
    """How a bf16 teacher is made from float32 weights: its parameters are cast, its buffers are
    left as from_pretrained(dtype=bf16) leaves them, so the two compute the same logits bit for
    bit. `model.to(bfloat16)` would round the rotary frequencies (inv_freq) too."""
    from transformers import AutoModelForCausalLM

    from srd.models.load import cast_parameters

    path = tiny_models["llama-teacher"]
    loaded = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    cast = cast_parameters(AutoModelForCausalLM.from_pretrained(path), torch.bfloat16, "cpu").eval()
    rounded = AutoModelForCausalLM.from_pretrained(path).to(torch.bfloat16).eval()
    freq = dict(cast.named_buffers())["model.rotary_emb.inv_freq"]
    assert freq.dtype == torch.float32 and torch.equal(freq, dict(loaded.named_buffers())["model.rotary_emb.inv_freq"])
    assert dict(rounded.named_buffers())["model.rotary_emb.inv_freq"].dtype == torch.bfloat16  # what is avoided
    assert all(p.dtype == torch.bfloat16 for p in cast.parameters())
    ids = torch.randint(5, 100, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(cast(input_ids=ids).logits, loaded(input_ids=ids).logits)
