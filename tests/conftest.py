"""Shared fixtures: a tiny offline tokenizer and tiny random-init Llama / GPT-2 models."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# train.precision=auto means bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and float32 on the
# others: the tests' float32 references (golden losses, exact resume) must hold on either kind, so
# auto stays float32 here, also in the torchrun processes that inherit this environment. Tests of
# the bf16 path ask for it by name.
os.environ["SRD_CPU_BF16"] = "0"

CORPUS = [
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
    "Below is an instruction that describes a task, paired with an input that provides further context.",
    "### Instruction:\n### Input:\n### Response:\n",
    "The moon is dark. The sun is bright. Paris is the capital of France. Water boils at 100 degrees.",
    "What is the capital of France? Name three colors. Summarize the text. Translate to German.",
    "red green blue one two three four five six seven eight nine ten answer question because",
]

ROWS = [
    {"instruction": "What is the capital of France?", "input": "", "output": "Paris is the capital of France."},
    {"instruction": "Name three colors.", "input": "", "output": "red, green and blue"},
    {
        "instruction": "Summarize the text.",
        "input": "The moon is dark. The sun is bright.",
        "output": "The moon is dark.",
    },
    {"instruction": "Count to five.", "input": "", "output": "one two three four five"},
    {"instruction": "When does water boil?", "input": "", "output": "Water boils at 100 degrees."},
    {"instruction": "Translate to German.", "input": "one two three", "output": "eins zwei drei"},
    {"instruction": "Which is bright?", "input": "The moon is dark. The sun is bright.", "output": "The sun."},
    {"instruction": "Name a number.", "input": "", "output": "seven"},
]


CHAT_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)


def with_chat_template(tiny_models: dict[str, Path], folder: Path) -> dict[str, Path]:
    """Copies of the tiny llama teacher and student in `folder` whose tokenizers have CHAT_TEMPLATE."""
    import shutil

    models = {}
    for name in ("llama-teacher", "llama-student"):
        models[name] = Path(shutil.copytree(tiny_models[name], folder / name))
        config = json.loads((models[name] / "tokenizer_config.json").read_text())
        config["chat_template"] = CHAT_TEMPLATE
        (models[name] / "tokenizer_config.json").write_text(json.dumps(config))
    return models


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


def make_llama(vocab: int, layers: int = 2, seed: int = 0, hidden: int = 64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    return LlamaForCausalLM(cfg)


def make_gpt2(vocab: int, layers: int = 2, seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=layers,
        n_head=4,
        n_positions=512,
        eos_token_id=0,
        bos_token_id=0,
        pad_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def make_t5(vocab: int, layers: int = 2, seed: int = 0):
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    cfg = T5Config(
        vocab_size=vocab,
        d_model=32,
        d_kv=8,
        d_ff=64,
        num_layers=layers,
        num_decoder_layers=layers,
        num_heads=4,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=0,
    )
    return T5ForConditionalGeneration(cfg)


def make_bart(vocab: int, layers: int = 2, seed: int = 0):
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    cfg = BartConfig(
        vocab_size=vocab,
        d_model=32,
        encoder_layers=layers,
        decoder_layers=layers,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=512,
        pad_token_id=0,
        bos_token_id=0,
        eos_token_id=0,
        decoder_start_token_id=0,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(cfg)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """Folders with tiny models + tokenizer: llama-teacher (4 layers), llama-student (2), gpt2 pair."""
    root = tmp_path_factory.mktemp("models")
    out = {}
    for name, model in {
        "llama-teacher": make_llama(len(tokenizer), layers=4, seed=1),
        "llama-student": make_llama(len(tokenizer), layers=2, seed=2),
        "gpt2-teacher": make_gpt2(len(tokenizer), layers=3, seed=3),
        "gpt2-student": make_gpt2(len(tokenizer), layers=2, seed=4),
        "t5-teacher": make_t5(len(tokenizer), layers=3, seed=5),
        "t5-student": make_t5(len(tokenizer), layers=1, seed=6),
        "bart-teacher": make_bart(len(tokenizer), layers=2, seed=7),
        "bart-student": make_bart(len(tokenizer), layers=1, seed=8),
    }.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture(scope="session")
def wide_models(tmp_path_factory, tokenizer) -> dict[str, Path]:
    """llama-teacher (2 layers) and llama-student (1) as wide as SmolLM2-135M (576): at this width
    a bf16 row's logits depend on the rows computed beside it, as in real models (at the tiny
    models' 64 they do not), so the tests of resumed bf16 work use these."""
    root = tmp_path_factory.mktemp("wide-models")
    out = {}
    for name, model in {
        "llama-teacher": make_llama(len(tokenizer), layers=2, seed=11, hidden=576),
        "llama-student": make_llama(len(tokenizer), layers=1, seed=12, hidden=576),
    }.items():
        model.save_pretrained(root / name)
        tokenizer.save_pretrained(root / name)
        out[name] = root / name
    return out


@pytest.fixture
def tiny_data(tmp_path) -> dict[str, Path]:
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    return {"train": train, "dev": dev}


@pytest.fixture(autouse=True)
def _reset_accelerate_state():
    yield
    try:
        from accelerate.state import AcceleratorState, PartialState

        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    except Exception:
        pass


def run_cli_in_processes(args: list[str], n: int = 2, port: int = 29517, timeout: float = 300):
    """Run `srd ARGS` in n CPU processes (gloo) with torchrun; returns the CompletedProcess.

    `accelerate launch --cpu` starts a single process on this toolchain, so tests use torchrun.
    """
    import subprocess
    import sys

    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(n),
        "--master_port",
        str(port),
        "-m",
        "srd.cli",
        *args,
    ]
    import contextlib
    import signal

    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONFAULTHANDLER": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
        start_new_session=True,  # a hung collective is killed with all its workers
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        import psutil  # an accelerate dependency

        workers = psutil.Process(proc.pid).children(recursive=True)  # torchrun puts them in their own groups
        for p in workers:
            p.send_signal(signal.SIGABRT)  # faulthandler: each worker prints where it hangs
        psutil.wait_procs(workers, timeout=10)
        os.killpg(proc.pid, signal.SIGKILL)
        for p in workers:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        out, err = proc.communicate()
        pytest.fail(f"srd {' '.join(args[:1])} in {n} processes did not finish in {timeout} s:\n{err[-3000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


@pytest.fixture(autouse=True)
def teacher_store(tmp_path_factory, monkeypatch):
    """Each test its own teacher store (inherited by the processes it starts): a row another test
    built is never found, and nothing is written into the user's cache folder."""
    root = tmp_path_factory.mktemp("teacher-store")
    monkeypatch.setenv("SRD_TEACHER_STORE", str(root))
    return root


@contextlib.contextmanager
def held_elsewhere(folder: Path):
    """Another process holding `folder`'s marker lock, as a running srd command does; yields it."""
    import subprocess
    import sys

    from srd.utils import MARKER

    code = (
        f"import fcntl, time; f = open({str(folder / MARKER)!r}, 'rb'); fcntl.flock(f, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        yield holder
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
