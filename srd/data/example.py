"""The `Example` record and readers for local data files (JSONL, JSON, CSV / TSV, Parquet)."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srd.utils import read_user_text

log = logging.getLogger(__name__)


class DataError(ValueError):
    """Bad input data: the message names the file, the row and the fix."""


@dataclass(kw_only=True)
class Example:
    """One instruction-following example.

    `output` is the reference response; some evaluation sets have several references
    (a list), and metrics take the maximum over them. Training uses the first one.
    """

    id: str
    instruction: str
    input: str = ""
    output: str | list[str] = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def references(self) -> list[str]:
        return list(self.output) if isinstance(self.output, list) else [self.output]

    @property
    def target(self) -> str:
        """The response used as the training target."""
        return self.references[0] if self.references else ""


# Column names accepted for each field, in order of preference. `prompt` rows of the
# MiniLLM/DistiLLM files (the rendered Alpaca prompt) also carry instruction/input/output, which
# are used; `prompt` alone is TRL's prompt/completion text format (the prompt as the model sees
# it: data.prompt_format=plain).
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "question", "text", "query", "prompt"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion", "target"),
}


def message_text(message: Any) -> str:
    """A chat message's content as text: a string, or TRL's content parts ({"type": "text",
    "text": ...}) joined; anything else (no content, an image part) is a DataError."""
    if not isinstance(message, dict):
        raise DataError(f"a chat message must be an object with role and content, got {type(message).__name__}")
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise DataError(
                    f"a {message.get('role', 'chat')} message has a {kind!r} part: only text parts are supported"
                )
            texts.append(part["text"])
        return "".join(texts)
    raise DataError(f"a {message.get('role', 'chat')} message has no text content ({content!r})")


def _chat(messages: list[Any]) -> list[dict[str, str]]:
    """Chat messages as {"role", "content"} text pairs, checked one by one."""
    out = []
    for j, m in enumerate(messages):
        try:
            text = message_text(m)
        except DataError as e:
            raise DataError(f"message {j}: {e}") from None
        if not isinstance(m.get("role"), str) or not m["role"]:
            raise DataError(f"message {j} has no role (system, user, assistant, ...)")
        out.append({"role": m["role"], "content": text})
    return out


def _is_chat(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(m, dict) for m in value)


def conversation_parts(row: dict[str, Any], require_output: bool) -> tuple[list[dict[str, str]], str | None] | None:
    """(prompt messages, reference or None) of a conversational row (TRL's formats: a `messages`
    column, whose last assistant message is the reference and everything before it the prompt;
    or prompt / completion as lists of chat messages), None for a text row."""
    if _is_chat(row.get("messages")):
        msgs = _chat(row["messages"])
        last = max((j for j, m in enumerate(msgs) if m["role"] == "assistant"), default=None)
        if last is None:
            if require_output:
                raise DataError("the conversation has no assistant message to learn from")
            return msgs, None
        if last == 0:
            raise DataError("the conversation starts with its assistant message: there is no prompt before it")
        return msgs[:last], msgs[last]["content"]
    if _is_chat(row.get("prompt")):
        completion = row.get("completion")
        if completion is None:
            return _chat(row["prompt"]), None
        if _is_chat(completion):
            return _chat(row["prompt"]), "".join(m["content"] for m in _chat(completion))
        if isinstance(completion, str):
            return _chat(row["prompt"]), completion
        raise DataError(f"field 'completion' must be text or a list of chat messages, got {type(completion).__name__}")
    return None


def _example_from_conversation(
    row: dict[str, Any], where: str, source: str, line: int, require_output: bool
) -> Example | None:
    try:
        conv = conversation_parts(row, require_output)
    except DataError as e:
        raise DataError(f"{where}: {e}") from None
    if conv is None:
        return None
    prompt, reference = conv
    if reference is None and require_output:
        raise DataError(f"{where}: no completion; training and evaluation need a reference response")
    users = [m["content"] for m in prompt if m["role"] == "user"]
    instruction = users[-1] if users else prompt[-1]["content"]
    if not any(m["content"].strip() for m in prompt):
        raise DataError(f"{where}: the prompt's messages are empty")
    ex_id = str(row.get("id", f"{Path(source).stem}-{line}"))
    meta = {k: v for k, v in row.items() if k in ("topic", "category")}
    return Example(id=ex_id, instruction=instruction, output=reference or "", meta={**meta, "messages": prompt})


def example_from_row(
    row: dict[str, Any],
    *,
    source: str,
    line: int,
    mapping: dict[str, str] | None = None,
    require_output: bool = True,
    strict: bool = False,
) -> Example:
    """Validate one raw row and turn it into an Example.

    `mapping` maps Example fields to column names (e.g. {"input": "context"}), tried before the
    aliases in FIELD_ALIASES. With `strict` (a mapping the user gave: data.*_column), a mapped
    field is read from its column alone, which every row must have: a misspelt name is an error,
    never a silent fall back on another column. A null there is an empty input or a missing
    instruction / reference.
    """
    where = f"{source}, {row_word(source)} {line}"
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with instruction/input/output fields, got {type(row).__name__}"
        )
    values: dict[str, Any] = {}
    for fld, aliases in FIELD_ALIASES.items():
        if strict and mapping and fld in mapping:
            if mapping[fld] not in row:
                raise DataError(
                    f"{where}: no column {mapping[fld]!r}, which data.{fld}_column names (mapping= in Python); "
                    f"found columns {sorted(row)}"
                )
            if row[mapping[fld]] is not None:
                values[fld] = row[mapping[fld]]
            continue
        cols = ((mapping[fld],) + aliases) if mapping and fld in mapping else aliases
        for col in cols:
            if col in row and row[col] is not None:
                values[fld] = row[col]
                break
    if not isinstance(values.get("instruction"), str):  # perhaps TRL's conversational rows
        conversation = _example_from_conversation(row, where, source, line, require_output)
        if conversation is not None:
            return conversation
    if _is_chat(values.get("output")) and isinstance(values.get("instruction"), str):
        raise DataError(
            f"{where}: the reference holds chat messages but the prompt is text; give both as chat messages "
            "or both as text"
        )
    if "instruction" not in values:
        raise DataError(
            f"{where}: no instruction field; expected one of {list(FIELD_ALIASES['instruction'])} "
            f"(found columns {sorted(row)}). Rename the column, or name it: data.instruction_column=<column> "
            "(mapping= in Python)"
        )
    if not isinstance(values["instruction"], str) or not values["instruction"].strip():
        raise DataError(f"{where}: field 'instruction' must be a non-empty string")
    inp = values.get("input", "")
    if not isinstance(inp, str):
        raise DataError(f"{where}: field 'input' must be a string, got {type(inp).__name__}")
    out = values.get("output")
    if out is None:
        if require_output:
            raise DataError(
                f"{where}: no output field; expected one of {list(FIELD_ALIASES['output'])}, or name it: "
                "data.output_column=<column>. Training and evaluation need a reference response."
            )
        out = ""
    if isinstance(out, list):
        if not out or not all(isinstance(o, str) for o in out):
            raise DataError(f"{where}: field 'output' must be a string or a non-empty list of strings")
    elif not isinstance(out, str):
        raise DataError(f"{where}: field 'output' must be a string or a list of strings, got {type(out).__name__}")
    for fld, text in (("instruction", values["instruction"]), ("input", inp), *(("output", o) for o in _texts(out))):
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DataError(
                f"{where}: field {fld!r} holds a character that is not valid Unicode ({e.reason}, "
                f"{text[e.start]!r} at position {e.start}); remove or replace it"
            ) from None
    ex_id = str(row.get("id", row.get("task_id", f"{Path(source).stem}-{line}")))
    meta = {k: v for k, v in row.items() if k in ("topic", "category", "task_id", "test_list", "test_setup_code")}
    return Example(id=ex_id, instruction=values["instruction"], input=inp, output=out, meta=meta)


def _texts(out: str | list[str]) -> list[str]:
    return out if isinstance(out, list) else [out]


# Local data files srd reads: JSON lines, a JSON list, CSV / TSV with a header row, Parquet.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet")


def row_word(source: str | Path) -> str:
    """How an error names a row of `source`: 'row' in a Parquet file (it has no lines), else 'line'."""
    return "row" if str(source).lower().endswith(".parquet") else "line"


def _csv_rows(path: Path, text: str) -> Iterable[tuple[int, Any]]:
    """(line where the row starts, {header: value}) from a CSV / TSV file with a header row; a row
    whose field count differs from the header's is an error (an unquoted delimiter in a field)."""
    import csv
    import io

    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    limit = csv.field_size_limit(len(text) + 1)  # a long document in one field (the module's default: 128 KiB)
    try:
        header = next(reader, None)
        if not header:
            raise DataError(f"{path}: no header row; the first line must name the columns (instruction,input,output)")
        repeated = sorted({h for h in header if header.count(h) > 1})
        if repeated:
            raise DataError(f"{path}, line 1: the header names {repeated} twice; each column needs its own name")
        start = reader.line_num + 1
        for fields in reader:
            if fields:  # blank lines are skipped, as in .jsonl
                if len(fields) != len(header):
                    raise DataError(
                        f"{path}, line {start}: {len(fields)} fields where the header has {len(header)}; "
                        f"quote a field that holds the delimiter ({delimiter!r}) or a line break"
                    )
                yield start, dict(zip(header, fields))
            start = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not valid {path.suffix[1:].upper()} ({e})") from None
    finally:
        csv.field_size_limit(limit)


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())


def _parquet_rows(path: Path) -> Iterable[tuple[int, Any]]:
    """(row number from 1, row) from a Parquet file, through pyarrow (installed with `datasets`)."""
    if not path.exists():
        raise DataError(f"data file {path} does not exist")
    if path.is_dir():
        raise DataError(f"data file {path} is a folder, not a file: name the file inside it")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow: pip install pyarrow (or srd[hub]), or convert it to .jsonl"
        ) from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's own errors: not Parquet, truncated, unreadable
        raise DataError(f"{path}: not a readable Parquet file ({_one_line(e)})") from None
    n, batches = 0, pf.iter_batches(batch_size=1024)
    while True:
        try:
            batch = next(batches, None)
        except Exception as e:  # a damaged row group further on
            raise DataError(f"{path}, after row {n}: not a readable Parquet file ({_one_line(e)})") from None
        if batch is None:
            return
        for row in batch.to_pylist():
            n += 1
            yield n, row


def read_rows(path: str | Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed row) pairs from a .jsonl file, a .json list, a .csv / .tsv file with a
    header row, or (row number, row) from a .parquet file."""
    path = Path(path)
    kind = path.suffix.lower()  # DATA.CSV as data.csv
    if kind == ".parquet":
        yield from _parquet_rows(path)
        return
    text = read_user_text(path, DataError, "data file")
    if kind in (".csv", ".tsv"):
        yield from _csv_rows(path, text)
        return
    if kind == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e}); a .json file must hold a list of objects") from e
        if not isinstance(data, list):
            raise DataError(f"{path}: a .json data file must hold a list of objects (use .jsonl for one per line)")
        yield from ((i + 1, row) for i, row in enumerate(data))
        return
    for i, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}, line {i}: not valid JSON ({e.msg}); each line must be one JSON object") from e


def read_examples(
    path: str | Path, *, mapping: dict[str, str] | None = None, require_output: bool = True, limit: int | None = None
) -> list[Example]:
    """Read and validate a local data file of examples (DATA_SUFFIXES); ids must be unique. The
    columns `mapping` names must be in every row (see example_from_row's `strict`)."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, row in read_rows(path):
        ex = example_from_row(
            row, source=str(path), line=line, mapping=mapping, require_output=require_output, strict=True
        )
        if ex.id in seen:
            word = row_word(path)
            raise DataError(f"{path}, {word} {line}: id {ex.id!r} repeats {word} {seen[ex.id]}; ids must be unique")
        seen[ex.id] = line
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples found")
    return examples


def _row_key(e: Example) -> str:
    """A row's prompt and first reference, whitespace and case aside (conversations: every message)."""

    def norm(text: str) -> str:
        return " ".join(text.split()).lower()

    messages = e.meta.get("messages") or ()
    prompt = [norm(str(m.get("content", ""))) for m in messages] if messages else [norm(e.instruction), norm(e.input)]
    return json.dumps([*prompt, norm(e.target)])


def shared_rows(rows: Iterable[Example], train: Iterable[Example]) -> list[str]:
    """The ids of `rows` whose prompt and reference are also one of `train`'s rows: a dev or test
    row the student trains on, so its score measures a row it has seen (the same prompt with
    another answer, a common question asked twice, is not counted)."""
    seen = {_row_key(e) for e in train}
    return [e.id for e in rows if _row_key(e) in seen]


def warn_shared_rows(what: str, rows: Sequence[Example], train: Iterable[Example], consequence: str) -> None:
    """Log `rows` (the set `what` names) that are training rows too (shared_rows), with
    `consequence` (what their scores then measure) and the first ids."""
    shared = shared_rows(rows, train)
    if shared:
        log.warning(
            "%s: %d of its %d rows are training rows too (prompt and reference): %s (%s)",
            what, len(shared), len(rows), consequence, ", ".join(shared[:5]) + (", ..." if len(shared) > 5 else ""),
        )  # fmt: skip
