"""The `Example` record and readers for local JSONL / JSON files."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srd.utils import read_user_text


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
# MiniLLM/DistiLLM files also carry instruction/input/output, which are used.
FIELD_ALIASES: dict[str, tuple[str, ...]] = {
    "instruction": ("instruction", "question", "text", "query"),
    "input": ("input", "context"),
    "output": ("output", "response", "answer", "completion", "target"),
}


def example_from_row(
    row: dict[str, Any], *, source: str, line: int, mapping: dict[str, str] | None = None, require_output: bool = True
) -> Example:
    """Validate one raw row and turn it into an Example.

    `mapping` maps Example fields to column names (e.g. {"input": "context"}); without
    it the aliases in FIELD_ALIASES are tried.
    """
    where = f"{source}, line {line}"
    if not isinstance(row, dict):
        raise DataError(
            f"{where}: expected a JSON object with instruction/input/output fields, got {type(row).__name__}"
        )
    values: dict[str, Any] = {}
    for fld, aliases in FIELD_ALIASES.items():
        cols = ((mapping[fld],) + aliases) if mapping and fld in mapping else aliases
        for col in cols:
            if col in row and row[col] is not None:
                values[fld] = row[col]
                break
    if "instruction" not in values:
        raise DataError(
            f"{where}: no instruction field; expected one of {list(FIELD_ALIASES['instruction'])} "
            f"(found columns {sorted(row)}). Rename the column or pass a column mapping."
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
                f"{where}: no output field; expected one of {list(FIELD_ALIASES['output'])}. "
                "Training and evaluation need a reference response."
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


def read_rows(path: str | Path) -> Iterable[tuple[int, Any]]:
    """(line number, parsed row) pairs from a .jsonl file or a .json list."""
    path = Path(path)
    text = read_user_text(path, DataError, "data file")
    if path.suffix == ".json":
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
    """Read and validate a JSONL/JSON file of examples; ids must be unique."""
    examples: list[Example] = []
    seen: dict[str, int] = {}
    for line, row in read_rows(path):
        ex = example_from_row(row, source=str(path), line=line, mapping=mapping, require_output=require_output)
        if ex.id in seen:
            raise DataError(f"{path}, line {line}: id {ex.id!r} repeats line {seen[ex.id]}; ids must be unique")
        seen[ex.id] = line
        examples.append(ex)
        if limit is not None and len(examples) >= limit:
            break
    if not examples:
        raise DataError(f"{path}: no examples found")
    return examples
