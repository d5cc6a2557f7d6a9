"""Conversations in data files (TRL's formats: a `messages` column, or prompt / completion as
lists of chat messages): read with row-level errors, rendered by the chat template only, the
oldest turns dropped first when too long, and refused up front under another prompt format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from srd.data import DataError, encode_prompt, read_examples
from srd.data.prompts import check_prompt_format
from srd.data.sources import with_instruction_suffix
from tests.conftest import CHAT_TEMPLATE, make_tokenizer, with_chat_template

TEMPLATE = CHAT_TEMPLATE
SYSTEM = {"role": "system", "content": "Be brief."}


def _turn(role: str, text: str) -> dict[str, str]:
    return {"role": role, "content": text}


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_conversational_rows_become_examples_with_their_prompt_messages(tmp_path):
    rows = [
        {
            "messages": [SYSTEM, _turn("user", "Hi"), _turn("assistant", "Hello"), _turn("user", "Name a colour")]
            + [_turn("assistant", "Red")]
        },
        {"id": "p", "prompt": [_turn("user", "2+2?")], "completion": [_turn("assistant", "4")]},
        {
            "prompt": [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "x"}]}],
            "completion": "x",
        },
    ]
    a, b, c = read_examples(_write(tmp_path / "chat.jsonl", rows))
    assert (a.id, a.instruction, a.target) == ("chat-1", "Name a colour", "Red")  # the last user message
    assert a.meta["messages"] == [SYSTEM, _turn("user", "Hi"), _turn("assistant", "Hello"), rows[0]["messages"][3]]
    assert (b.id, b.instruction, b.target, b.meta["messages"]) == ("p", "2+2?", "4", [_turn("user", "2+2?")])
    assert (c.instruction, c.target) == ("Say x", "x")  # TRL's text content parts, joined


@pytest.mark.parametrize(
    "row,message",
    [
        ({"messages": [_turn("user", "Hi")]}, "line 2: the conversation has no assistant message"),
        ({"messages": [_turn("assistant", "Hi")]}, "line 2: the conversation starts with its assistant message"),
        ({"messages": [{"content": "Hi"}, _turn("assistant", "x")]}, "line 2: message 0 has no role"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image"}]}, _turn("assistant", "x")]},
            "line 2: message 0: a user message has a 'image' part",
        ),
        ({"prompt": [_turn("user", "Hi")]}, "line 2: no completion"),
        ({"prompt": "Hi", "completion": [_turn("assistant", "x")]}, "line 2: the reference holds chat messages"),
        ({"messages": [_turn("user", " "), _turn("assistant", "x")]}, "line 2: the prompt's messages are empty"),
    ],
)
def test_bad_conversations_name_the_file_line_and_message(tmp_path, row, message):
    path = _write(tmp_path / "chat.jsonl", [{"messages": [_turn("user", "a"), _turn("assistant", "b")]}, row])
    with pytest.raises(DataError, match=message):
        read_examples(path)


def test_a_conversation_is_rendered_by_the_chat_template_and_shortened_oldest_turn_first(tmp_path):
    tok = make_tokenizer()
    tok.chat_template = TEMPLATE
    turns = [SYSTEM, _turn("user", "first question " * 8), _turn("assistant", "first answer " * 8)]
    turns += [_turn("user", "What now?")]
    ex = read_examples(_write(tmp_path / "c.jsonl", [{"messages": [*turns, _turn("assistant", "Stop.")]}]))[0]
    whole = tok(tok.apply_chat_template(turns, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert encode_prompt(tok, ex, "chat", 512) == whole["input_ids"]
    # too long: the first user turn goes with its answer (whole turns); the system message and the last turn stay
    short = [SYSTEM, _turn("user", "What now?")]
    text = tok.apply_chat_template(short, tokenize=False, add_generation_prompt=True)
    short_ids = tok(text, add_special_tokens=False)
    assert encode_prompt(tok, ex, "chat", len(short_ids["input_ids"]) + 2) == short_ids["input_ids"]
    # still too long: the last message loses text from its end, the template stays whole
    ids = encode_prompt(tok, ex, "chat", len(short_ids["input_ids"]) - 2)
    assert len(ids) <= len(short_ids["input_ids"]) - 2 and tok.decode(ids).endswith("assistant: ")
    # a template's own refusal (Gemma-style: no system role) is one line naming the example
    tok.chat_template = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    tok.chat_template += "{% endif %}"
    with pytest.raises(DataError, match=r"^example c-1: the tokenizer's chat template refused .*System role not supp"):
        encode_prompt(tok, ex, "chat", 512)
    tok.chat_template = TEMPLATE
    # another prompt format would flatten the conversation: refused, naming the example and the fix
    with pytest.raises(DataError, match=r"example c-1 is a conversation .* data\.prompt_format=chat .* 'alpaca'"):
        encode_prompt(tok, ex, "alpaca", 512)
    with pytest.raises(DataError, match="data.train .*example c-1 is a conversation"):
        check_prompt_format([ex], "plain", "data.train (c.jsonl)")
    check_prompt_format([ex], "chat", "data.train")
    # an instruction suffix goes after the last user message
    suffixed = with_instruction_suffix([ex], "Answer in one word.")[0]
    assert suffixed.meta["messages"][-1] == _turn("user", "What now?\nAnswer in one word.")
    assert ex.meta["messages"][-1] == _turn("user", "What now?")  # the original is unchanged


def test_srd_reflect_and_train_on_a_conversation_file(tmp_path, tiny_models):
    """The CLI on a `messages` file: refused before any model loads under the Alpaca format;
    reflection and one stage of training with data.prompt_format=chat."""
    from srd.cli import main

    models = with_chat_template(tiny_models, tmp_path)
    rows = [
        {"messages": [SYSTEM, _turn("user", f"Count to {i}."), _turn("assistant", " ".join(map(str, range(1, i + 1))))]}
        for i in range(1, 9)
    ]
    data = _write(tmp_path / "chat.jsonl", rows)
    args = [
        "-",
        f"model.teacher={models['llama-teacher']}",
        f"model.student={models['llama-student']}",
        f"data.train={data}",
        f"data.dev={data}",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "generation.max_new_tokens=4",
        "dev_eval.num_examples=2",
        "name=x",
    ]
    out = tmp_path / "runs"
    assert main(["reflect", "--no-progress", *args, f"output_dir={out}"]) == 2
    assert not out.exists()  # refused before anything was written
    assert main(["reflect", "--no-progress", *args, f"output_dir={out}", "data.prompt_format=chat"]) == 0
    assert main(["train", "--no-progress", *args, f"output_dir={tmp_path / 't'}", "data.prompt_format=chat"]) == 0
    done = json.loads(next((tmp_path / "t").rglob("done.json")).read_text())
    assert done["steps"] == 4
