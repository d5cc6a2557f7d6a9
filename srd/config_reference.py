"""The configuration reference (docs/configuration.md), made from the config dataclasses
themselves: every key, its type, its default, and the comments written next to it in
`srd/config.py`. `srd config --reference` prints it; a test checks that the file in docs/
is what this produces, so the reference cannot drift from the code."""

from __future__ import annotations

import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

from srd import config as config_module
from srd.config import RunConfig

HEADER = """# Configuration reference

Every option of a recipe (`srd run`, `srd train`, `srd reflect`, `srd prune`; `srd eval` reads
the eval, data and generation sections), with its type and default. Set them in a YAML recipe
(sections as mappings) or as `section.key=value` overrides on the command line; unknown keys
are errors that list the valid ones, and `srd config RECIPE [overrides]` prints the resolved
config. This page is generated from `srd/config.py` (`srd config --reference`), and a test
keeps it in step with the code.
"""


def _field_comments(cls: type) -> dict[str, str]:
    """The comment lines above a field and the comment at the end of its line, by field name."""
    source = inspect.getsource(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    out: dict[str, str] = {}
    pending: list[str] = []
    line_fields: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.NAME and tok.start[1] == 4 and tok.string in names and tok.start[0] not in line_fields:
            line_fields[tok.start[0]] = tok.string
            if pending:
                out[tok.string] = " ".join(pending)
                pending = []
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").strip()
            if tok.start[0] in line_fields:  # a comment at the end of a field's line
                name = line_fields[tok.start[0]]
                out[name] = f"{out[name]} {text}".strip() if name in out else text
            elif tok.start[1] == 4:
                pending.append(text)
        elif tok.type == tokenize.NAME and tok.string == "def":
            pending = []
    return out


def _type_text(tp: Any) -> str:
    text = str(tp).replace("typing.", "")
    if isinstance(tp, type):
        text = tp.__name__
    return text.replace("NoneType", "None")


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return repr(f.default)
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return repr(f.default_factory())  # type: ignore[misc]
    return "required"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _row(key: str, tp: Any, f: dataclasses.Field, comments: dict[str, str]) -> str:
    what = _cell(comments.get(f.name, ""))
    return f"| `{key}` | `{_cell(_type_text(tp))}` | `{_cell(_default_text(f))}` | {what} |"


def reference_markdown() -> str:
    """docs/configuration.md: the top-level keys, then one table per section."""
    hints = typing.get_type_hints(RunConfig, vars(config_module))
    lines = [HEADER, "## Top level", "", "| key | type | default | what |", "|---|---|---|---|"]
    sections = []
    comments = _field_comments(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            sections.append((f.name, tp))
            continue
        lines.append(_row(f.name, tp, f, comments))
    for name, cls in sections:
        doc = inspect.cleandoc(cls.__doc__ or "")
        lines += ["", f"## `{name}`", ""]
        if doc and not doc.startswith(cls.__name__ + "("):
            lines += [doc, ""]
        lines += ["| key | type | default | what |", "|---|---|---|---|"]
        sub_hints = typing.get_type_hints(cls, vars(config_module))
        sub_comments = _field_comments(cls)
        for f in dataclasses.fields(cls):
            lines.append(_row(f"{name}.{f.name}", sub_hints[f.name], f, sub_comments))
    return "\n".join(lines) + "\n"
