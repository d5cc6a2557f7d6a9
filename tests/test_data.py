"""Data: readers and their errors, named sets, the Alpaca template, tokenisation, batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srd.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    bucketed_batches,
    collate,
    encode_example,
    encode_prompt,
    load_examples,
    load_hub,
    read_examples,
    render_prompt,
)
from srd.data.sources import data_dirs

SHARED = next((d for d in data_dirs() if (d / "dolly" / "train.jsonl").exists()), None)
needs_shared = pytest.mark.skipif(SHARED is None, reason="../shared/data not present")


def _write(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_read_examples_with_list_outputs_and_aliases(tmp_path):
    p = _write(
        tmp_path / "d.jsonl",
        [
            {"instruction": "a", "input": "", "output": "x"},
            {"instruction": "b", "context": "ctx", "response": "y"},
            {"id": "z", "instruction": "c", "output": ["r1", "r2"]},
        ],
    )
    exs = read_examples(p)
    assert [e.input for e in exs] == ["", "ctx", ""]
    assert exs[1].target == "y"
    assert exs[2].references == ["r1", "r2"] and exs[2].target == "r1" and exs[2].id == "z"


@pytest.mark.parametrize(
    "row,message",
    [
        ('{"instruction": "a", "output": "b"', r"line 2: not valid JSON"),
        ({"input": "x", "output": "y"}, r"line 2: no instruction field"),
        ({"instruction": "a"}, r"line 2: no output field"),
        ({"instruction": "a", "output": 3}, r"line 2: field 'output' must be a string"),
        ({"instruction": "a", "output": []}, r"line 2: field 'output' must be a string or a non-empty list"),
        ({"instruction": "", "output": "y"}, r"line 2: field 'instruction' must be a non-empty string"),
        ({"instruction": "a", "input": 5, "output": "y"}, r"line 2: field 'input' must be a string"),
    ],
)
def test_bad_rows_name_file_line_and_field(tmp_path, row, message):
    p = _write(tmp_path / "bad.jsonl", [{"instruction": "ok", "output": "ok"}, row])
    with pytest.raises(DataError, match=message) as e:
        read_examples(p)
    assert "bad.jsonl" in str(e.value)


def test_duplicate_ids_and_empty_files(tmp_path):
    p = _write(
        tmp_path / "dup.jsonl",
        [{"id": 1, "instruction": "a", "output": "b"}, {"id": 1, "instruction": "c", "output": "d"}],
    )
    with pytest.raises(DataError, match="line 2: id '1' repeats line 1"):
        read_examples(p)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataError, match="no examples"):
        read_examples(empty)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "missing.jsonl")


def test_json_list_files(tmp_path):
    p = tmp_path / "d.json"
    p.write_text(json.dumps([{"instruction": "a", "output": "b"}]))
    assert read_examples(p)[0].target == "b"
    p.write_text(json.dumps({"instruction": "a"}))
    with pytest.raises(DataError, match="list of objects"):
        read_examples(p)


def test_csv_and_tsv_files_with_a_header_row(tmp_path):
    p = tmp_path / "d.csv"
    # a quoted field may hold the delimiter and a line break; blank lines are skipped; a BOM is dropped
    p.write_text('\ufeffinstruction,context,response\n"Say hi, twice",,"hi\nhi"\n\nName a colour,,red\n', "utf-8")
    a, b = load_examples(str(p))
    assert (a.instruction, a.input, a.target) == ("Say hi, twice", "", "hi\nhi")
    assert (b.target, b.id) == ("red", "d-5")  # ids from the line where the row starts
    import csv

    long = tmp_path / "long.csv"  # one field longer than the csv module's default limit (128 KiB)
    long.write_text("instruction,output\n" + "Summarise: " + "x" * 200_000 + ",ok\n")
    limit = csv.field_size_limit()
    assert read_examples(long)[0].target == "ok" and csv.field_size_limit() == limit  # the limit is restored
    upper = tmp_path / "D.CSV"  # the kind of file comes from its suffix in any case
    upper.write_text("instruction,output\na,b\n")
    assert read_examples(upper)[0].target == "b"
    t = tmp_path / "d.tsv"
    t.write_text("question\tanswer\nWhat is 2+2?\t4, of course\n")
    assert read_examples(t)[0].target == "4, of course"
    # a row with an unquoted delimiter: the line where it starts (after the 2-line row) and the fix
    p.write_text('instruction,output\n"a",\n"two\nlines",b\nc,d,e\n')
    with pytest.raises(DataError, match=r"d\.csv, line 5: 3 fields where the header has 2; quote a field"):
        read_examples(p)
    p.write_text("instruction,output\n,b\n")
    with pytest.raises(DataError, match=r"d\.csv, line 2: field 'instruction' must be a non-empty string"):
        read_examples(p)
    p.write_text("prompt,output,output\nx,y,z\n")
    with pytest.raises(DataError, match=r"line 1: the header names \['output'\] twice"):
        read_examples(p)
    p.write_text("")
    with pytest.raises(DataError, match="no header row"):
        read_examples(p)
    p.write_text("task,output\nx,y\n")
    with pytest.raises(DataError, match=r"d\.csv, line 2: no instruction field.*found columns \['output', 'task'\]"):
        read_examples(p)


def test_column_options_name_the_columns_srd_does_not_know(tmp_path):
    from srd.config import ConfigError, load_config
    from srd.recipes.train import load_data

    p = tmp_path / "odd.csv"
    p.write_text("task_text,extra,gold\nSay hi,ignored,hi\n")
    with pytest.raises(DataError, match=r"line 2: no instruction field.*data\.instruction_column=<column>"):
        load_examples(str(p))
    cfg = load_config(None, [f"data.train={p}", f"data.dev={p}", "data.instruction_column=task_text"])
    with pytest.raises(DataError, match=r"line 2: no output field.*data\.output_column=<column>"):
        load_data(cfg)
    cfg = load_config(
        None, [f"data.train={p}", f"data.dev={p}", "data.instruction_column=task_text"] + ["data.output_column=gold"]
    )
    (train, dev) = load_data(cfg)
    assert (train[0].instruction, train[0].input, train[0].target) == ("Say hi", "", "hi") and dev == train
    with pytest.raises(ConfigError, match="data.input_column must name a column"):
        load_config(None, ["data.input_column=' '"])


def test_a_named_column_is_the_only_one_read_for_its_field(tmp_path):
    """data.*_column replaces the known names: a misspelt one is an error, not the known 'text'
    column read instead; a null there is an empty input or a missing reference."""
    p = _write(
        tmp_path / "t.jsonl",
        [
            {"text": "the whole rendered row", "task": "Say hi", "ctx": None, "output": "hi"},
            {"text": "another", "task": "Say bye", "ctx": "politely", "output": "bye"},
        ],
    )
    with pytest.raises(DataError, match=r"t\.jsonl, line 1: no column 'taks', which data\.instruction_column names"):
        load_examples(str(p), mapping={"instruction": "taks"})
    exs = load_examples(str(p), mapping={"instruction": "task", "input": "ctx"})
    assert [(e.instruction, e.input) for e in exs] == [("Say hi", ""), ("Say bye", "politely")]
    assert [e.instruction for e in load_examples(str(p))] == ["the whole rendered row", "another"]
    q = _write(tmp_path / "q.jsonl", [{"task": "Say hi", "gold": None, "output": "hi"}])
    with pytest.raises(DataError, match=r"q\.jsonl, line 1: no output field"):
        load_examples(str(q), mapping={"instruction": "task", "output": "gold"})


def test_parquet_files_name_rows_not_lines(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    table = pa.table({"instruction": ["a", "b", "c"], "output": [["x", "y"], ["z"], ["w"]], "id": ["1", "2", "1"]})
    pq.write_table(table, p, row_group_size=2)
    with pytest.raises(DataError, match=r"d\.parquet, row 3: id '1' repeats row 1"):
        read_examples(p)
    pq.write_table(table.slice(0, 2), p)
    first, second = load_examples(str(p))
    assert first.references == ["x", "y"] and second.target == "z"
    pq.write_table(pa.table({"instruction": ["a", ""], "output": ["x", "y"]}), p)
    with pytest.raises(DataError, match=r"d\.parquet, row 2: field 'instruction' must be a non-empty string"):
        read_examples(p)
    # a damaged row group further on: one line, after the rows read before it
    pq.write_table(pa.table({"instruction": ["a" * 50] * 2000, "output": ["b" * 50] * 2000}), p, row_group_size=1500)
    damaged = bytearray(p.read_bytes())
    start = pq.ParquetFile(p).metadata.row_group(1).column(0).data_page_offset
    damaged[start + 20 : start + 60] = b"\xff" * 40
    p.write_bytes(bytes(damaged))
    with pytest.raises(DataError, match=r"d\.parquet, after row \d+: not a readable Parquet file \([^\n]*\)$"):
        read_examples(p)
    p.write_text('{"instruction": "not parquet"}\n')
    with pytest.raises(DataError, match=r"d\.parquet: not a readable Parquet file"):
        read_examples(p)
    with pytest.raises(DataError, match="does not exist"):
        read_examples(tmp_path / "none.parquet")


def test_trl_prompt_completion_text_rows(tmp_path):
    p = _write(tmp_path / "trl.jsonl", [{"prompt": "The sky is", "completion": " blue."}])
    ex = read_examples(p)[0]
    assert (ex.instruction, ex.target) == ("The sky is", " blue.")
    # MiniLLM rows carry a rendered `prompt` beside their instruction: the instruction is used
    _write(p, [{"prompt": "### Instruction: x", "instruction": "x", "output": "y"}])
    assert read_examples(p)[0].instruction == "x"
    # a list of reference strings is not a conversation
    _write(p, [{"instruction": "a", "completion": ["b", "c"]}])
    assert read_examples(p)[0].references == ["b", "c"]


def test_unknown_spec_lists_named_sets():
    with pytest.raises(DataError, match="named sets: .*dolly"):
        load_examples("not-a-set")


def test_hub_code_path_with_a_local_json_builder(tmp_path):
    """The real `datasets.load_dataset` path, with a column mapping, on a local file."""
    pytest.importorskip("datasets")
    p = _write(tmp_path / "hub.jsonl", [{"question": f"q{i}", "ctx": "", "answer": f"a{i}"} for i in range(5)])
    exs = load_hub(
        "json",
        split="train",
        data_files=str(p),
        rows=(1, 4),
        mapping={"instruction": "question", "input": "ctx", "output": "answer"},
        cache_dir=str(tmp_path / "hf-cache"),
    )
    assert [e.instruction for e in exs] == ["q1", "q2", "q3"]
    assert [e.target for e in exs] == ["a1", "a2", "a3"]
    assert exs[0].id == "json-train-1"
    with pytest.raises(
        DataError, match=r"hf:json:train, line 1: no column 'questoin'.*found columns \['answer', 'ctx'"
    ):
        load_hub(
            "json",
            split="train",
            data_files=str(p),
            mapping={"instruction": "questoin"},
            cache_dir=str(tmp_path / "hf-cache"),
        )


def test_named_set_missing_locally_without_hub(tmp_path, monkeypatch):
    monkeypatch.setenv("SRD_DATA_DIR", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    import srd.data.sources as sources

    monkeypatch.setattr(sources, "data_dirs", lambda explicit=None: [tmp_path])
    with pytest.raises(DataError, match="no local copy.*SRD_DATA_DIR"):
        load_examples("samsum")


def test_a_chosen_data_folder_that_is_not_there_is_an_error_not_a_fallback(tmp_path, monkeypatch):
    """A mistyped data.data_dir or $SRD_DATA_DIR does not pass in silence to another copy of the
    set (../shared/data) or to the Hub."""
    import srd.data.sources as sources

    monkeypatch.setattr(sources, "load_hub", lambda *a, **k: pytest.fail("went to the Hub"))
    monkeypatch.setenv("SRD_DATA_DIR", str(tmp_path / "typo"))
    with pytest.raises(DataError, match=r"^\$SRD_DATA_DIR is .*typo, which is not a folder"):
        load_examples("dolly-eval")
    monkeypatch.setenv("SRD_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError, match=r"^data.data_dir is .*elsewhere, which is not a folder"):
        load_examples("dolly-eval", data_dir=str(tmp_path / "elsewhere"))
    (tmp_path / "a.jsonl").write_text('{"instruction": "x", "output": "y"}\n')
    assert len(load_examples(str(tmp_path / "a.jsonl"), data_dir=str(tmp_path / "elsewhere"))) == 1  # no named set


def test_evaluation_sets_fall_back_to_minillm_hub_files(tmp_path, monkeypatch):
    """Without a local copy, the paper's five instruction-following sets come from MiniLLM's Hub
    repos (valid.jsonl; S-NI and UnNI from the subsets with references of 11+ words)."""
    import srd.data.sources as sources

    calls = []
    monkeypatch.setattr(sources, "data_dirs", lambda explicit=None: [tmp_path])
    monkeypatch.setattr(sources, "load_hub", lambda dataset_id, **kw: calls.append((dataset_id, kw)) or [])
    load_examples("dolly-eval")
    load_examples("self-inst", limit=3)
    for name in ("vicuna-eval", "s-ni", "unni"):
        load_examples(name)
    assert [c[0] for c in calls] == [
        "MiniLLM/dolly",
        "MiniLLM/self-inst",
        "MiniLLM/Vicuna",
        "MiniLLM/sinst",
        "MiniLLM/uinst",
    ]
    assert [c[1]["data_files"] for c in calls] == ["valid.jsonl"] * 3 + ["11_/valid.jsonl"] * 2
    assert all(c[1]["split"] == "train" for c in calls)
    assert calls[1][1]["limit"] == 3


def test_named_set_from_explicit_data_dir(tmp_path):
    _write(
        (tmp_path / "gsm8k").mkdir() or tmp_path / "gsm8k" / "train.jsonl",
        [{"question": "1+1?", "answer": "2\n#### 2"}],
    )
    exs = load_examples("gsm8k", data_dir=str(tmp_path))
    assert exs[0].instruction == "1+1?" and exs[0].target.endswith("#### 2")


@needs_shared
@pytest.mark.parametrize(
    "name,path",
    [
        ("dolly", "dolly/train.jsonl"),
        ("dolly-dev", "dolly/dev.jsonl"),
        ("dolly-eval", "dolly/eval.jsonl"),
        ("self-inst", "self-inst/eval.jsonl"),
    ],
)
def test_alpaca_template_matches_every_shipped_prompt(name, path):
    rows = [json.loads(line) for line in (SHARED / path).read_text().splitlines() if line.strip()]
    exs = load_examples(name)
    assert len(exs) == len(rows)
    assert all(render_prompt(e.instruction, e.input, "alpaca") == r["prompt"] for e, r in zip(exs, rows))


@needs_shared
def test_named_sets_load_with_limit():
    for name in ("gsm8k", "mbpp", "samsum", "xsum", "iwslt17-en-de"):
        exs = load_examples(name, limit=3)
        assert len(exs) == 3 and all(e.instruction and e.target for e in exs)


def test_encoding_masks_prompt_and_keeps_eos(tokenizer):
    ex = Example(id="1", instruction="What is the capital of France?", output="Paris is the capital.")
    enc = encode_example(tokenizer, ex, fmt="alpaca", max_prompt_len=256, max_len=512)
    prompt = encode_prompt(tokenizer, ex, "alpaca", 256)
    assert enc.input_ids[: len(prompt)] == prompt
    assert enc.labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    assert enc.labels[len(prompt) :] == enc.input_ids[len(prompt) :]
    assert enc.input_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(enc.input_ids[len(prompt) : -1]) == "Paris is the capital."


def test_long_prompts_keep_the_response_tail(tokenizer):
    ex = Example(id="1", instruction="Summarize the text.", input="The moon is dark. " * 200, output="dark")
    ids = encode_prompt(tokenizer, ex, "alpaca", 64)
    assert len(ids) <= 64
    text = tokenizer.decode(ids)
    assert text.endswith("### Response:\n") and "### Instruction:\nSummarize the text." in text
    ex2 = Example(id="2", instruction="The sun is bright. " * 200, output="x")
    text2 = tokenizer.decode(encode_prompt(tokenizer, ex2, "alpaca", 64))
    assert text2.endswith("### Response:\n")
    with pytest.raises(DataError, match="template alone"):
        encode_prompt(tokenizer, ex, "alpaca", 8)


def test_response_truncated_to_max_len(tokenizer):
    ex = Example(id="1", instruction="Count.", output="one two three " * 100)
    enc = encode_example(tokenizer, ex, fmt="alpaca", max_prompt_len=64, max_len=80)
    assert len(enc.input_ids) == 80


def test_chat_format_needs_a_template(tokenizer):
    ex = Example(id="1", instruction="hi", output="yo")
    with pytest.raises(DataError, match="chat template"):
        encode_prompt(tokenizer, ex, "chat", 64)


def test_collate_pads_right_and_masks(tokenizer):
    exs = [Example(id=str(i), instruction="Name a number.", output="seven " * i) for i in (1, 5)]
    enc = [encode_example(tokenizer, e, fmt="alpaca", max_prompt_len=64, max_len=128) for e in exs]
    b = collate(enc, pad_token_id=0, pad_to_multiple_of=8)
    assert b["input_ids"].shape[1] % 8 == 0
    n0 = len(enc[0].input_ids)
    assert b["attention_mask"][0, :n0].all() and not b["attention_mask"][0, n0:].any()
    assert (b["labels"][0, n0:] == IGNORE_INDEX).all()


def test_bucketed_batches_cover_everything_once_and_are_deterministic():
    lengths = [(i * 37) % 101 for i in range(103)]
    a = bucketed_batches(lengths, 8, seed=1, epoch=0, bucket_size=4)
    assert sorted(i for b in a for i in b) == list(range(103))
    assert a == bucketed_batches(lengths, 8, seed=1, epoch=0, bucket_size=4)
    assert a != bucketed_batches(lengths, 8, seed=1, epoch=1, bucket_size=4)

    # padding inside a batch is far below what random batches give
    def waste(batches):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert waste(a) < 0.5 * waste(bucketed_batches(lengths, 8, seed=1, epoch=0, bucket_size=1))


def test_load_mixture_prefixes_ids_and_limits_each_set(tmp_path):
    from srd.data import load_mixture

    a = _write(tmp_path / "a.jsonl", [{"id": i, "instruction": f"a{i}", "output": "x"} for i in range(3)])
    b = _write(tmp_path / "b.jsonl", [{"id": i, "instruction": f"b{i}", "output": "y"} for i in range(3)])
    mixed = load_mixture([str(a), str(b)], limit=2)
    assert [e.id for e in mixed] == ["a:0", "a:1", "b:0", "b:1"]
    assert [e.instruction for e in mixed] == ["a0", "a1", "b0", "b1"]
    assert [e.id for e in load_mixture(str(a))] == ["0", "1", "2"]  # a single spec keeps its ids
    with pytest.raises(DataError, match="repeated ids"):
        load_mixture([str(a), str(a)])


def test_hub_rows_with_a_nested_translation_column(tmp_path):
    """IWSLT on the Hub keeps {en, de} inside a `translation` column: flattened, then mapped."""
    pytest.importorskip("datasets")
    from srd.data.sources import NAMED_SETS

    p = _write(tmp_path / "iwslt.jsonl", [{"translation": {"en": f"Hello {i}", "de": f"Hallo {i}"}} for i in range(3)])
    exs = load_hub(
        "json", split="train", data_files=str(p), ns=NAMED_SETS["iwslt17-en-de-train"], cache_dir=str(tmp_path / "c")
    )
    assert [(e.input, e.target) for e in exs] == [(f"Hello {i}", f"Hallo {i}") for i in range(3)]
    assert exs[0].instruction == "Translate the following text from English to German."


def test_instruction_suffix_is_appended_on_a_new_line():
    from srd.data.sources import with_instruction_suffix

    ex = Example(id="q", instruction="What is 2 + 3?", input="", output="5\n#### 5", meta={"k": 1})
    (out,) = with_instruction_suffix([ex], "Please reason step by step.")
    assert out.instruction == "What is 2 + 3?\nPlease reason step by step." and out.meta == {"k": 1}
    assert with_instruction_suffix([ex], None) == [ex]


def test_rows_shared_with_the_training_rows_are_found_and_said(tmp_path, caplog):
    """A dev or benchmark row that is a training row too (prompt and reference, whitespace and
    case aside) is logged with its id; the same question with another answer is not."""
    from srd.config import load_config
    from srd.data.example import Example, shared_rows
    from srd.eval.evaluate import check_benchmarks
    from srd.recipes.train import load_data

    def ex(i, instruction, output, **kw):
        return Example(id=i, instruction=instruction, output=output, **kw)

    train = [ex("t1", "What is  Python?", "A language."), ex("t2", "Name a bird.", "Robin")]
    rows = [
        ex("d1", "what is python?", "a  language."),  # the same row
        ex("d2", "What is Python?", "A snake."),  # another answer: a common question, not a copy
        ex("d3", "Name a bird.", "Robin", input="in Europe"),  # another input
    ]
    assert shared_rows(rows, train) == ["d1"]
    chat = ex("c", "What is Python?", "A language.", meta={"messages": [{"role": "user", "content": "Hi"}]})
    assert shared_rows([chat], train) == []  # a conversation is keyed on its messages
    rows = [{"instruction": "Say hi.", "output": "hi"}, {"instruction": "x", "output": "y"}]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text(json.dumps({"instruction": "say  hi.", "output": "Hi"}) + "\n")
    cfg_args = [f"data.train={tmp_path / 'train.jsonl'}", f"data.dev={tmp_path / 'dev.jsonl'}"]
    cfg = load_config(None, cfg_args)
    with caplog.at_level("WARNING"):
        load_data(cfg)
    assert "data.dev" in caplog.text and "1 of its 1 rows are training rows too" in caplog.text
    assert "dev-1" in caplog.text
    # a dev row the run never scores (beyond data.dev_limit and dev_eval.num_examples) is not said
    (tmp_path / "dev.jsonl").write_text(
        "".join(json.dumps({"instruction": f"Q{i}?", "output": "A"}) + "\n" for i in range(3))
        + json.dumps({"instruction": "say  hi.", "output": "Hi"})
        + "\n"
    )
    caplog.clear()
    with caplog.at_level("WARNING"):
        load_data(load_config(None, [*cfg_args, "data.dev_limit=2", "dev_eval.num_examples=3"]))
    assert "training rows too" not in caplog.text
    with caplog.at_level("WARNING"):
        load_data(load_config(None, [*cfg_args, "data.dev_limit=2", "dev_eval.num_examples=4"]))
    assert "data.dev (" in caplog.text and "1 of its 4 rows are training rows too" in caplog.text
    caplog.clear()
    lines = (tmp_path / "dev.jsonl").read_text().splitlines()
    (tmp_path / "dev.jsonl").write_text("\n".join(lines[-1:] + lines[:-1]) + "\n")  # the shared row first
    with caplog.at_level("WARNING"):
        load_data(load_config(None, [*cfg_args, "data.dev_limit=2", "dev_eval.num_examples=1"]))
    assert "the first 2 rows, which the run scores): 1 of its 2 rows are training rows too" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        train_rows = load_data(cfg, warn=False)[0]
        check_benchmarks([str(tmp_path / "dev.jsonl")], train=train_rows)
    assert caplog.text.count("training rows too") == 1
    assert "their scores measure rows the student trained on" in caplog.text
