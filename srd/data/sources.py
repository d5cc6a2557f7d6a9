"""Where examples come from: named sets, local files, or the Hugging Face Hub.

A data spec is one of
  * a named set (`dolly`, `dolly-dev`, `dolly-eval`, `self-inst`, `gsm8k`, ...), looked up
    in: the explicit `data_dir`, then `$SRD_DATA_DIR`, then `../shared/data` (next to the
    working directory or to this checkout), then the Hub;
  * a path to a .jsonl / .json / .csv / .tsv / .parquet file;
  * `hf:<dataset id>[:<config>]:<split>` for any Hub dataset with instruction/input/output
    columns (or a column mapping).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from srd.data.example import DATA_SUFFIXES, DataError, Example, example_from_row, read_examples, read_rows


@dataclass(frozen=True)
class NamedSet:
    local: str  # path relative to a data directory
    hub_id: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_rows: tuple[int | None, int | None] = (None, None)  # slice of the Hub split
    mapping: dict[str, str] = field(default_factory=dict)  # Example field -> column
    fixed_instruction: str | None = None  # for sets without an instruction column
    description: str = ""
    hub_data_files: str | None = None  # a file inside the Hub repo (MiniLLM's evaluation sets)
    hub_nested: str | None = None  # a column holding a dict of fields (IWSLT's "translation")


_DOLLY_MAP = {"instruction": "instruction", "input": "context", "output": "response"}

NAMED_SETS: dict[str, NamedSet] = {
    # The KD split of the MiniLLM/DistiLLM/SRD papers: raw Dolly rows [1000:] (the local copy
    # also drops prompts over 256 GPT-2 tokens; the Hub fallback keeps them).
    "dolly": NamedSet(
        "dolly/train.jsonl",
        "databricks/databricks-dolly-15k",
        None,
        "train",
        (1000, None),
        _DOLLY_MAP,
        description="Dolly-15k KD training split (11,435 rows)",
    ),
    "dolly-dev": NamedSet(
        "dolly/dev.jsonl",
        "databricks/databricks-dolly-15k",
        None,
        "train",
        (0, 1000),
        _DOLLY_MAP,
        description="first 1,000 raw Dolly rows, for checkpoint selection",
    ),
    # MiniLLM's evaluation sets on the Hub: valid.jsonl with instruction/input/output/prompt
    "dolly-eval": NamedSet(
        "dolly/eval.jsonl", "MiniLLM/dolly", description="DollyEval, 500 held-out rows", hub_data_files="valid.jsonl"
    ),
    "self-inst": NamedSet(
        "self-inst/eval.jsonl",
        "MiniLLM/self-inst",
        description="SelfInst user-oriented instructions (242)",
        hub_data_files="valid.jsonl",
    ),
    # the paper's other three instruction-following benchmarks (MiniLLM's evaluation files; S-NI
    # and UnNI: the subsets whose references are at least 11 words long, MiniLLM's `11_` folders)
    "vicuna-eval": NamedSet(
        "vicuna/eval.jsonl", "MiniLLM/Vicuna", description="VicunaEval questions", hub_data_files="valid.jsonl"
    ),
    "s-ni": NamedSet(
        "sinst/eval.jsonl",
        "MiniLLM/sinst",
        description="Super-NaturalInstructions test tasks, references of 11+ words",
        hub_data_files="11_/valid.jsonl",
    ),
    "unni": NamedSet(
        "uinst/eval.jsonl",
        "MiniLLM/uinst",
        description="Unnatural Instructions, references of 11+ words",
        hub_data_files="11_/valid.jsonl",
    ),
    "gsm8k": NamedSet(
        "gsm8k/train.jsonl",
        "openai/gsm8k",
        "main",
        "train",
        mapping={"instruction": "question", "output": "answer"},
        description="GSM8K train (7,473)",
    ),
    "gsm8k-test": NamedSet(
        "gsm8k/test.jsonl",
        "openai/gsm8k",
        "main",
        "test",
        mapping={"instruction": "question", "output": "answer"},
        description="GSM8K test (1,319)",
    ),
    "mbpp": NamedSet(
        "mbpp/test.jsonl",
        "google-research-datasets/mbpp",
        "full",
        "test",
        mapping={"instruction": "text", "output": "code"},
        description="MBPP test (500)",
    ),
    "mbpp-train": NamedSet(
        "mbpp/train.jsonl",
        "google-research-datasets/mbpp",
        "full",
        "train",
        mapping={"instruction": "text", "output": "code"},
        description="MBPP train (Hub)",
    ),
    "samsum": NamedSet(
        "samsum/validation.jsonl",
        mapping={"input": "context", "output": "response"},
        fixed_instruction="Summarize the following dialogue.",
        description="SAMSum validation",
    ),
    "samsum-test": NamedSet(
        "samsum/test.jsonl",
        mapping={"input": "context", "output": "response"},
        fixed_instruction="Summarize the following dialogue.",
        description="SAMSum test",
    ),
    "xsum": NamedSet(
        "xsum/test.jsonl",
        "EdinburghNLP/xsum",
        None,
        "test",
        mapping={"input": "document", "output": "summary"},
        fixed_instruction="Summarize the following article in one sentence.",
        description="XSum subset (1,000)",
    ),
    "xsum-train": NamedSet(
        "xsum/train.jsonl",
        "EdinburghNLP/xsum",
        None,
        "train",
        mapping={"input": "document", "output": "summary"},
        fixed_instruction="Summarize the following article in one sentence.",
        description="XSum train (Hub)",
    ),
    "xsum-validation": NamedSet(
        "xsum/validation.jsonl",
        "EdinburghNLP/xsum",
        None,
        "validation",
        mapping={"input": "document", "output": "summary"},
        fixed_instruction="Summarize the following article in one sentence.",
        description="XSum validation (Hub)",
    ),
    "iwslt17-en-de-train": NamedSet(
        "iwslt17-en-de/train.json",
        "IWSLT/iwslt2017",
        "iwslt2017-en-de",
        "train",
        mapping={"input": "en", "output": "de"},
        fixed_instruction="Translate the following text from English to German.",
        description="IWSLT17 en-de train (Hub)",
        hub_nested="translation",
    ),
    "iwslt17-en-de-validation": NamedSet(
        "iwslt17-en-de/validation.json",
        "IWSLT/iwslt2017",
        "iwslt2017-en-de",
        "validation",
        mapping={"input": "en", "output": "de"},
        fixed_instruction="Translate the following text from English to German.",
        description="IWSLT17 en-de validation",
        hub_nested="translation",
    ),
    "iwslt17-en-de": NamedSet(
        "iwslt17-en-de/test.json",
        mapping={"input": "en", "output": "de"},
        fixed_instruction="Translate the following text from English to German.",
        description="IWSLT17 en-de test",
    ),
}


def data_dirs(explicit: str | None = None) -> list[Path]:
    """Candidate folders for named sets, in lookup order."""
    dirs = []
    if explicit:
        dirs.append(Path(explicit).expanduser())
    if os.environ.get("SRD_DATA_DIR"):
        dirs.append(Path(os.environ["SRD_DATA_DIR"]).expanduser())
    dirs.append(Path.cwd().parent / "shared" / "data")
    dirs.append(Path(__file__).resolve().parents[3] / "shared" / "data")
    return dirs


def _check_chosen_dirs(explicit: str | None) -> None:
    """A data folder the user chose (data.data_dir, $SRD_DATA_DIR) must be one: a mistyped one
    would otherwise pass in silence to the next candidate, another copy of the set, or the Hub."""
    for what, value in (("data.data_dir", explicit), ("$SRD_DATA_DIR", os.environ.get("SRD_DATA_DIR"))):
        if value and not Path(value).expanduser().is_dir():
            raise DataError(
                f"{what} is {value}, which is not a folder: name the folder that holds the named data sets, "
                "or leave it unset"
            )


def _read_local_named(path: Path, name: str, ns: NamedSet, limit: int | None) -> list[Example]:

    out = []
    for line, row in read_rows(path):
        if ns.fixed_instruction:
            row = {**row, "instruction": ns.fixed_instruction}
        if "id" not in row and "task_id" not in row:
            row = {**row, "id": f"{name}-{line}"}
        out.append(example_from_row(row, source=str(path), line=line, mapping=ns.mapping or None))
        if limit is not None and len(out) >= limit:
            break
    return out


def load_hub(
    dataset_id: str,
    *,
    config: str | None = None,
    split: str = "train",
    rows: tuple[int | None, int | None] = (None, None),
    mapping: dict[str, str] | None = None,
    limit: int | None = None,
    ns: NamedSet | None = None,
    **load_kwargs: Any,
) -> list[Example]:
    """Load a Hugging Face dataset split and map its columns to Examples.

    `dataset_id` may also be a builder name such as "json" with `data_files=...` in
    `load_kwargs` (how the tests exercise this path offline). The columns `mapping` names must
    exist (a named set's own mapping, `ns.mapping`, falls back on the known names instead).
    """
    try:
        import datasets
    except ImportError as e:
        raise DataError("reading from the Hugging Face Hub needs the `datasets` package: pip install datasets") from e
    try:
        ds = datasets.load_dataset(dataset_id, config, split=split, **load_kwargs)
    except Exception as e:  # network, missing split, auth...
        raise DataError(f"could not load {dataset_id!r} (config {config!r}, split {split!r}) from the Hub: {e}") from e
    start, stop = rows
    if start is not None or stop is not None:
        ds = ds.select(range(start or 0, min(stop if stop is not None else len(ds), len(ds))))
    if limit is not None:
        ds = ds.select(range(min(limit, len(ds))))
    source = f"hf:{dataset_id}:{split}"
    out = []
    for i, row in enumerate(ds, start=1):
        row = dict(row)
        if ns and ns.hub_nested and isinstance(row.get(ns.hub_nested), dict):
            row.update(row.pop(ns.hub_nested))
        if ns and ns.fixed_instruction:
            row["instruction"] = ns.fixed_instruction
        row.setdefault("id", f"{dataset_id.split('/')[-1]}-{split}-{(start or 0) + i - 1}")
        out.append(
            example_from_row(
                row, source=source, line=i, mapping=mapping or (ns.mapping if ns else None), strict=bool(mapping)
            )
        )
    if not out:
        raise DataError(f"{source}: no examples")
    return out


def load_examples(
    spec: str, *, data_dir: str | None = None, limit: int | None = None, mapping: dict[str, str] | None = None
) -> list[Example]:
    """Resolve a data spec (named set, file path, or hf:id[:config]:split) to Examples.
    `mapping` (Example field -> column) applies to files and Hub sets; named sets keep theirs."""
    if spec.startswith("hf:"):
        parts = spec[3:].split(":")
        if len(parts) == 1:
            return load_hub(parts[0], limit=limit, mapping=mapping)
        if len(parts) == 2:
            return load_hub(parts[0], split=parts[1], limit=limit, mapping=mapping)
        return load_hub(parts[0], config=parts[1], split=parts[2], limit=limit, mapping=mapping)
    if spec in NAMED_SETS:
        ns = NAMED_SETS[spec]
        _check_chosen_dirs(data_dir)
        for d in data_dirs(data_dir):
            if (d / ns.local).exists():
                return _read_local_named(d / ns.local, spec, ns, limit)
        if ns.hub_id is None:
            tried = ", ".join(str(d / ns.local) for d in data_dirs(data_dir))
            raise DataError(
                f"named set {spec!r} has no local copy (looked in: {tried}) and no Hub source; "
                "set data.data_dir or $SRD_DATA_DIR to a folder holding it (see docs/data-and-models.md)"
            )
        extra = {"data_files": ns.hub_data_files} if ns.hub_data_files else {}
        return load_hub(
            ns.hub_id, config=ns.hub_config, split=ns.hub_split, rows=ns.hub_rows, limit=limit, ns=ns, **extra
        )
    path = Path(spec).expanduser()
    if path.suffix.lower() in DATA_SUFFIXES or path.exists():
        return read_examples(path, limit=limit, mapping=mapping)
    raise DataError(
        f"data spec {spec!r} is not a named set, a {'/'.join(DATA_SUFFIXES)} file, or hf:<id>[:config]:split; "
        f"named sets: {', '.join(sorted(NAMED_SETS))}"
    )


def is_local(spec: str, *, data_dir: str | None = None) -> bool:
    """Whether `spec` reads from this machine alone: a file that exists, or a named set with a
    local copy (not the Hub)."""
    if spec.startswith("hf:"):
        return False
    if spec in NAMED_SETS:
        return any((d / NAMED_SETS[spec].local).exists() for d in data_dirs(data_dir))
    return Path(spec).expanduser().is_file()


def load_mixture(
    specs: str | list[str],
    *,
    data_dir: str | None = None,
    limit: int | None = None,
    mapping: dict[str, str] | None = None,
) -> list[Example]:
    """One data spec, or several concatenated; with several, ids become "<spec>:<id>" so
    they stay unique, and `limit` and `mapping` apply to each set."""
    if isinstance(specs, str):
        return load_examples(specs, data_dir=data_dir, limit=limit, mapping=mapping)
    out: list[Example] = []
    for spec in specs:
        name = Path(spec).stem if spec.lower().endswith(DATA_SUFFIXES) else spec
        for ex in load_examples(spec, data_dir=data_dir, limit=limit, mapping=mapping):
            out.append(
                Example(
                    id=f"{name}:{ex.id}", instruction=ex.instruction, input=ex.input, output=ex.output, meta=ex.meta
                )
            )
    ids = [ex.id for ex in out]
    if len(set(ids)) != len(ids):
        raise DataError(f"data sets {specs} give repeated ids after prefixing; give each set a distinct name")
    return out


def with_instruction_suffix(examples: list[Example], suffix: str | None) -> list[Example]:
    """Examples with `suffix` on a new line after each instruction (unchanged when None); in a
    conversation, after its last user message."""
    if not suffix:
        return examples
    return [
        Example(
            id=ex.id,
            instruction=f"{ex.instruction}\n{suffix}",
            input=ex.input,
            output=ex.output,
            meta=ex.meta if ex.meta.get("messages") is None else {**ex.meta, "messages": _suffixed(ex, suffix)},
        )
        for ex in examples
    ]


def _suffixed(ex: Example, suffix: str) -> list[dict[str, str]]:
    messages = [dict(m) for m in ex.meta["messages"]]
    last_user = max((j for j, m in enumerate(messages) if m["role"] == "user"), default=len(messages) - 1)
    messages[last_user]["content"] = f"{messages[last_user]['content']}\n{suffix}"
    return messages
