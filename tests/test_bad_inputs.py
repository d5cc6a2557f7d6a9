"""Every bad input is one line: for each of these, the command exits 2 with one line that names
the file or key and the way on, reads no weights, and changes nothing on disk."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from srd.cli import main

ROWS = [{"instruction": f"Say {w}.", "output": f"{w} is a word."} for w in ("hi", "yes", "no", "ok")]


def _write(path: Path, text: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(text, bytes) else path.write_text)(text)
    return path


@pytest.fixture
def world(tmp_path, tiny_models, monkeypatch):
    """A folder with good and bad inputs; the commands run inside it."""
    w = tmp_path / "w"
    w.mkdir()
    monkeypatch.chdir(w)
    shutil.copytree(tiny_models["llama-teacher"], w / "teacher")
    shutil.copytree(tiny_models["llama-student"], w / "student")
    _write(w / "train.jsonl", "".join(json.dumps(r) + "\n" for r in ROWS))
    _write(w / "latin1.jsonl", '{"instruction": "caf\xe9", "output": "x"}\n'.encode("latin-1"))
    _write(w / "surrogate.jsonl", '{"instruction": "bad \\ud800 char", "output": "x"}\n')
    _write(w / "broken.jsonl", json.dumps(ROWS[0]) + "\n{not json\n")
    _write(w / "noinstr.jsonl", '{"question_text": "x", "output": "y"}\n')
    _write(
        w / "dupid.jsonl",
        '{"id": "a", "instruction": "x", "output": "y"}\n{"id": "a", "instruction": "z", "output": "y"}\n',
    )
    _write(w / "badtype.jsonl", '{"instruction": 5, "output": "y"}\n')
    _write(w / "empty.jsonl", "\n")
    _write(w / "ragged.csv", "instruction,output\nSay hi.,hi\nSay a, b.,a\n")
    _write(
        w / "chat.jsonl",
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n",
    )
    (w / "folder").mkdir()
    # an evaluation folder whose train benchmark was decoded with a 3-token budget
    settings = {"sampling": False, "max_new_tokens": 3, "no_repeat_ngram_size": 0, "n": 4, "rows": "0" * 64}
    _write(w / "prior" / "decoding.json", json.dumps({"benchmarks": {"train": settings}}))
    _write(w / "prior" / "train" / "greedy.rank0.partial", "")
    shutil.copytree(w / "student", w / "notok")
    for f in (w / "notok").glob("tokenizer*"):
        f.unlink()
    shutil.copytree(w / "student", w / "cut")
    weights = (w / "cut" / "model.safetensors").read_bytes()
    _write(w / "cut" / "model.safetensors", weights[: len(weights) // 2])
    _write(w / "noconfig" / "model.safetensors", b"x")
    _write(w / "fake.gguf", "not a gguf\n")
    _write(w / "dup.yaml", "train:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    _write(w / "latin1.yaml", "name: caf\xe9\n".encode("latin-1"))
    _write(w / "list.yaml", "- a\n- b\n")
    _write(w / "configs" / "mine.yaml", "name: mine\n")
    _write(w / "notes" / "mine.txt", "the user's")
    (w / "students").mkdir()
    _write(w / "afile", "a file")
    # a run folder srd wrote, whose records were damaged later
    fake = w / "runs" / "fake"
    _write(fake / "config.yaml", "name: fake\noutput_dir: runs\nmethod: srd\n")
    # a finished run srd marked as its own
    done = w / "runs" / "done"
    _write(done / ".srd-folder.json", json.dumps({"written_by": "srd", "kind": "run"}))
    _write(done / "config.yaml", "name: done\noutput_dir: runs\nmethod: srd\n")
    # another tool's run folder: its own config.yaml and report.md
    _write(w / "theirs" / "config.yaml", "model: resnet50\nepochs: 90\n")
    _write(w / "theirs" / "report.md", "# their report\n")
    _write(fake / "results.json", '{"broken')
    _write(fake / "eval" / "greedy" / "summary.json", '{"broken')

    import huggingface_hub

    def offline(*a, **k):  # as on a machine without a network, at once
        raise ConnectionError("no network")

    monkeypatch.setattr(huggingface_hub, "model_info", offline)
    return w


def _no_weights(monkeypatch):
    import safetensors.torch
    import transformers

    def fail(*a, **k):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.PreTrainedModel, "from_pretrained", classmethod(fail))
    monkeypatch.setattr(safetensors.torch, "load_file", fail)


RUN = ["model.teacher=teacher", "model.student=student", "data.train=train.jsonl", "output_dir=runs", "name=r"]
PRUNE = ["prune", "--teacher", "teacher", "--layers", "1", "--out", "pruned", "--data", "train.jsonl"]
EVAL = ["eval", "student", "--benchmarks", "train.jsonl", "--greedy"]


def _run(*extra: str, cmd: str = "run") -> list[str]:
    keys = {x.split("=", 1)[0] for x in extra}
    return [cmd, "-", *[x for x in RUN if x.split("=", 1)[0] not in keys], *extra, "--no-progress"]


CASES: list[tuple[str, list[str], list[str]]] = [
    # (name, argv, substrings of the one error line)
    ("train data is a folder", _run("data.train=folder"), ["folder", "is a folder"]),
    ("train data not UTF-8", _run("data.train=latin1.jsonl"), ["latin1.jsonl, line 1", "UTF-8"]),
    ("train data lone surrogate", _run("data.train=surrogate.jsonl"), ["surrogate.jsonl, line 1", "instruction"]),
    ("train data missing", _run("data.train=missing.jsonl"), ["missing.jsonl"]),
    ("train data broken JSON line", _run("data.train=broken.jsonl"), ["broken.jsonl, line 2", "JSON"]),
    ("train data without instruction", _run("data.train=noinstr.jsonl"), ["noinstr.jsonl", "instruction"]),
    ("train data with a repeated id", _run("data.train=dupid.jsonl"), ["dupid.jsonl, line 2", "unique"]),
    ("train data with a wrong type", _run("data.train=badtype.jsonl"), ["badtype.jsonl", "instruction"]),
    ("train data empty", _run("data.train=empty.jsonl"), ["empty.jsonl", "no examples"]),
    ("dev data is a folder", _run("data.dev=folder"), ["folder", "is a folder"]),
    ("a misspelt column option", _run("data.instruction_column=instr"), ["train.jsonl, line 1", "'instr'"]),
    ("CSV row with an unquoted comma", _run("data.train=ragged.csv"), ["ragged.csv, line 3", "quote"]),
    ("a conversation under alpaca", _run("data.train=chat.jsonl"), ["chat", "data.prompt_format=chat"]),
    ("student without tokenizer", _run("model.student=notok"), ["notok", "tokenizer"]),
    ("teacher weights cut short", _run("model.teacher=cut"), ["cut/model.safetensors", "cut short"]),
    ("student without config.json", _run("model.student=noconfig"), ["noconfig", "config.json"]),
    ("a missing local student", _run("model.student=students/x"), ["students/x", "does not exist"]),
    ("a missing ./ student", _run("model.student=./nowhere"), ["nowhere"]),
    ("a .gguf that is not one", _run("model.teacher=fake.gguf"), ["fake.gguf", "GGUF"]),
    ("a missing .gguf", _run("model.teacher=none.gguf"), ["none.gguf", "does not exist"]),
    ("recipe is a folder", ["run", "folder"], ["folder", "is a folder"]),
    ("recipe with a repeated key", ["run", "dup.yaml"], ["dup.yaml, line 3", "'lr' appears twice"]),
    ("recipe not UTF-8", ["run", "latin1.yaml"], ["latin1.yaml", "UTF-8"]),
    ("recipe is a list", ["run", "list.yaml"], ["list.yaml", "mapping"]),
    ("recipe missing", ["run", "nope.yaml"], ["nope.yaml", "does not exist"]),
    ("recipe named without its folder", ["run", "mine"], ["mine does not exist", "did you mean configs/mine.yaml?"]),
    ("run name ..", _run("name=.."), ["name", "plain folder name"]),
    ("run name with a slash", _run("name=a/b"), ["name", "plain folder name"]),
    ("unknown key", _run("trian.lr=1"), ["trian"]),
    ("wrong type", _run("train.lr=fast"), ["train.lr"]),
    ("out of range", _run("reflect.keep_ratio=2"), ["reflect.keep_ratio"]),
    (
        "a temperature of zero",
        _run("curriculum.tau_end=0"),
        ["curriculum.tau_end must be > 0, got 0", "(from the command line: curriculum.tau_end=0)"],
    ),
    ("a negative dev interval", _run("train.eval_every=-5"), ["train.eval_every", "train.eval_every=-5)"]),
    ("unknown scorer", _run("reflect.scorers=[nope]"), ["nope", "rouge_l"]),
    ("code-running scorer not allowed", _run("reflect.scorers=[rouge_l, tests_pass]"), ["tests_pass", "SRD_ALLOW"]),
    ("unknown benchmark", _run("eval.benchmarks=[nope-bench]"), ["nope-bench"]),
    (
        "a data folder that is not there",
        _run("eval.benchmarks=[dolly-eval]", "data.data_dir=nowhere"),
        ["data.data_dir is nowhere, which is not a folder"],
    ),
    (
        "eval: a data folder that is not there",
        ["eval", "student", "--benchmarks", "dolly-eval", "--data-dir", "nowhere"],
        ["data.data_dir is nowhere, which is not a folder"],
    ),
    ("mbpp not allowed", _run("eval.benchmarks=[mbpp]"), ["mbpp", "allow_code_execution"]),
    ("output_dir is a file", _run("output_dir=afile"), ["afile"]),
    ("a user's folder as the run folder", _run("output_dir=.", "name=notes"), ["notes", "overwrite=true"]),
    (
        "another tool's run folder (its own config.yaml) as the run folder",
        _run("output_dir=.", "name=theirs"),
        ["theirs", "srd did not write", "overwrite=true"],
    ),
    ("scheduled_kd with re_reflect", _run("method=scheduled_kd", "curriculum.re_reflect=true"), ["re_reflect"]),
    ("repeated dev seeds", _run("dev_eval.seeds=[1, 1]"), ["dev_eval.seeds"]),
    ("a negative top-k", _run("generation.top_k=-1"), ["generation.top_k must be >= 0", "generation.top_k=-1)"]),
    ("an empty stop string", _run('generation.stop_strings=[""]'), ["generation.stop_strings", "ends every answer"]),
    ("eval: --greedy with --seeds", [*EVAL, "--seeds", "1", "2"], ["--greedy or --seeds, not both", "[1, 2]"]),
    ("a negative seed", _run("seed=-1"), ["seed: a seed is an integer from 0 to 4294967295, got -1", "seed=-1)"]),
    (
        "teacher scorer without a teacher",
        _run("reflect.scorers=[teacher_ce]", "model.teacher=null", "loss.alpha=1.0"),
        ["teacher_ce", "model.teacher"],
    ),
    ("train: data is a folder", _run("data.train=folder", cmd="train"), ["folder", "is a folder"]),
    ("train: student without tokenizer", _run("model.student=notok", cmd="train"), ["notok", "tokenizer"]),
    ("reflect: data not UTF-8", _run("data.train=latin1.jsonl", cmd="reflect"), ["latin1.jsonl", "UTF-8"]),
    ("reflect: student cut short", _run("model.student=cut", cmd="reflect"), ["cut/model.safetensors"]),
    ("eval: a .gguf that is not one", ["eval", "fake.gguf", "--benchmarks", "train.jsonl"], ["fake.gguf", "GGUF"]),
    ("eval: benchmark is a folder", ["eval", "student", "--benchmarks", "folder"], ["folder"]),
    (
        "eval: into a folder decoded with another token budget",
        [*EVAL, "--out", "prior", "--max-new-tokens", "5"],
        ["prior/train", "max_new_tokens 3, now 5", "--out"],
    ),
    ("eval: mbpp not allowed", ["eval", "student", "--benchmarks", "mbpp"], ["mbpp", "SRD_ALLOW_CODE_EXECUTION"]),
    ("eval: missing run folder", ["eval", "runs/none", "--benchmarks", "train.jsonl"], ["runs/none"]),
    (
        "eval: a run that has not finished",
        ["eval", "runs/done", "--benchmarks", "train.jsonl"],
        ["runs/done is an srd run that has not finished", "saved no model yet"],
    ),
    ("eval: model without tokenizer", ["eval", "notok", "--benchmarks", "train.jsonl"], ["notok", "tokenizer"]),
    ("eval: weights cut short", ["eval", "cut", "--benchmarks", "train.jsonl"], ["cut/model.safetensors"]),
    ("eval: benchmark not UTF-8", [*EVAL[:3], "latin1.jsonl"], ["latin1.jsonl", "UTF-8"]),
    (
        "eval: a run whose results.json is damaged",
        ["eval", "runs/fake", "--benchmarks", "train.jsonl"],
        ["runs/fake/results.json", "damaged"],
    ),
    ("prune: more layers than the teacher has", [*PRUNE[:3], "--layers", "40", *PRUNE[5:]], ["40", "decoder layers"]),
    ("prune: a layer index out of range", [*PRUNE[:3], "--keep", "0,1,99", *PRUNE[5:]], ["99", "prune.keep"]),
    ("prune: zero layers", [*PRUNE[:3], "--layers", "0", *PRUNE[5:]], ["prune.layers"]),
    (
        "prune: --layers and --keep that disagree",
        [*PRUNE, "--keep", "0,1"],
        ["prune.layers=1 and prune.keep=[0, 1] (2 layers) disagree", "--layers N or --keep"],
    ),
    ("prune: a layer kept twice", [*PRUNE[:3], "--keep", "0,0", *PRUNE[5:]], ["prune.keep must not repeat"]),
    ("prune: onto a user's folder", [*PRUNE[:5], "--out", "notes", *PRUNE[7:]], ["notes", "--overwrite"]),
    ("eval: into a user's folder", [*EVAL, "--out", "notes"], ["evaluation folder notes", "srd did not write"]),
    ("eval: into a run's own folder", [*EVAL, "--out", "runs/done"], ["srd's run folder, not an evaluation folder"]),
    (
        "eval: another model into a run's evaluation folder",
        [*EVAL, "--out", "runs/done/eval/greedy"],
        ["runs/done/eval/greedy is where run runs/done keeps its own scores", "srd eval runs/done"],
    ),
    (
        "prune: onto a run's folder",
        [*PRUNE[:5], "--out", "runs/done", *PRUNE[7:]],
        ["runs/done", "srd's run folder, not a student folder", "--overwrite"],
    ),
    (
        "a run's folder as the teacher store",
        _run("loss.teacher_top_k=4", "loss.teacher_store=runs/done"),
        ["teacher store runs/done", "srd's run folder, not a teacher-store folder"],
    ),
    ("prune: teacher weights cut short", [PRUNE[0], "--teacher", "cut", *PRUNE[3:]], ["cut/model.safetensors"]),
    ("prune: texts are a folder", [*PRUNE[:7], "--data", "folder"], ["folder"]),
    ("prune: the teacher as the output", [*PRUNE[:5], "--out", "teacher", *PRUNE[7:]], ["teacher"]),
    (
        "compare: a damaged evaluation summary",
        ["compare", "runs/fake", "runs/fake", "--eval", "greedy"],
        ["summary.json", "damaged"],
    ),
    ("report: a damaged results.json", ["report", "runs/fake"], ["runs/fake/results.json", "damaged"]),
    ("report: not a run folder", ["report", "notes"], ["notes"]),
    ("report: another tool's folder with a config.yaml", ["report", "theirs"], ["theirs", "srd did not write"]),
    ("config: a repeated key", ["config", "dup.yaml"], ["dup.yaml, line 3", "twice"]),
    ("config: a folder", ["config", "folder"], ["folder", "is a folder"]),
    ("prune: an output folder that cannot be made", [*PRUNE[:5], "--out", "afile/sub", *PRUNE[7:]], ["afile/sub"]),
    ("eval: a repeated seed", ["eval", "student", "--benchmarks", "train.jsonl", "--seeds", "1", "1"], ["eval.seeds"]),
    (
        "eval: a negative seed",
        ["eval", "student", "--benchmarks", "train.jsonl", "--seeds", "10", "-1"],
        ["eval.seeds: a seed is an integer from 0 to 4294967295, got -1"],
    ),
    ("a Hub id, offline and not cached", _run("model.student=someone/nope"), ["someone/nope", "cannot be reached"]),
    ("eval: a Hub id, offline", ["eval", "someone/nope", "--benchmarks", "train.jsonl"], ["someone/nope", "Hub"]),
    ("compare: a run that does not exist", ["compare", "runs/none", "runs/fake"], ["runs/none", "not a folder"]),
    ("store: a folder that does not exist", ["store", "--store", "nowhere"], ["nowhere", "no such folder"]),
    ("store: --set-aside without --verify", ["store", "--set-aside"], ["--set-aside", "--verify"]),
    ("store: a folder that is not a store", ["store", "--store", "notes"], ["notes", "not a teacher store"]),
    (
        "store: --remove in a folder that is not a store",
        ["store", "--store", "notes", "--remove", "mine.txt"],
        ["notes is not a teacher store", "nothing removed"],
    ),
    ("store: --remove with --verify", ["store", "--remove", "x", "--verify"], ["--remove and --verify"]),
    (
        "a teacher top-k as large as the vocabulary",
        _run("loss.teacher_top_k=100000", "loss.teacher_store=newstore"),
        ["loss.teacher_top_k=100000 must be smaller than the vocabulary"],
    ),
    (
        "a teacher store that is a file",
        _run("loss.teacher_top_k=4", "loss.teacher_store=train.jsonl"),
        ["teacher store", "train.jsonl", "is a file"],
    ),  # fmt: skip
    (
        "a teacher store holding other files",
        _run("loss.teacher_top_k=4", "loss.teacher_store=notes"),
        ["teacher store", "notes", "srd did not write"],
    ),  # fmt: skip
]


def _tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


@pytest.mark.parametrize("name,argv,wants", CASES, ids=[c[0] for c in CASES])
def test_a_bad_input_is_one_line(world, monkeypatch, capsys, name, argv, wants):
    monkeypatch.delenv("SRD_ALLOW_CODE_EXECUTION", raising=False)
    _no_weights(monkeypatch)
    before = _tree(world)
    capsys.readouterr()
    assert main(argv) == 2, name
    out, err = capsys.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(f"srd {argv[0]}: error: "), err
    assert all(w in lines[0] for w in wants), (wants, lines[0])
    assert _tree(world) == before  # nothing written, nothing removed
    assert not [
        p for p in world.rglob("*") if p.is_dir() and not any(p.iterdir()) and p.name not in ("folder", "students")
    ]


def test_there_are_at_least_fifty():
    assert len(CASES) >= 50
