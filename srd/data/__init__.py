"""Data: Example records, sources (files, named sets, the Hub), prompt formats, tokenisation."""

from srd.data.example import DataError, Example, read_examples
from srd.data.prompts import encode_prompt, render_prompt
from srd.data.sources import NAMED_SETS, load_examples, load_hub, load_mixture
from srd.data.tokenize import IGNORE_INDEX, Encoded, bucketed_batches, collate, encode_example, encode_examples

__all__ = [
    "IGNORE_INDEX",
    "NAMED_SETS",
    "DataError",
    "Encoded",
    "Example",
    "bucketed_batches",
    "collate",
    "encode_example",
    "encode_examples",
    "encode_prompt",
    "load_examples",
    "load_hub",
    "load_mixture",
    "read_examples",
    "render_prompt",
]
