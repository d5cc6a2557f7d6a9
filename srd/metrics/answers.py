"""Final-answer extraction for math benchmarks (GSM8K style).

Order of preference: the last `\\boxed{...}` (nested braces allowed), then a `#### x` line
(GSM8K references), then the last number in the text. Numbers are normalised (thousands
separators, `$`, trailing `.0`, a trailing period) and compared numerically.
"""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\$?\s?\d[\d,]*(?:\.\d+)?|-?\$?\s?\.\d+")


def _last_boxed(text: str) -> str | None:
    start = text.rfind("\\boxed")
    if start == -1:
        return None
    i = text.find("{", start)
    if i == -1:
        return None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None


_FRAC = re.compile(r"\\d?frac\{(-?[\d.]+)\}\{(-?[\d.]+)\}")


def normalize_number(text: str) -> str | None:
    """'1,234.50' -> '1234.5', '$-3' -> '-3', '7.' -> '7', '\\frac{1}{2}' -> '0.5';
    None if there is no number."""
    frac = _FRAC.search(text)
    if frac and float(frac.group(2)) != 0:
        text = repr(float(frac.group(1)) / float(frac.group(2)))
    found = _NUMBER.findall(text.replace("\\!", "").replace("{,}", ","))
    if not found:
        return None
    raw = found[-1].replace(",", "").replace("$", "").replace(" ", "")
    negative = raw.startswith("-")
    raw = raw.lstrip("-")
    try:
        value = float(raw)
    except ValueError:
        return None
    if negative:
        value = -value
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """The final answer of a solution, normalised, or None when there is none."""
    boxed = _last_boxed(text)
    if boxed is not None:
        return normalize_number(boxed) or (boxed.strip() or None)
    m = re.findall(r"####\s*(.+)", text)
    if m:
        return normalize_number(m[-1]) or m[-1].strip()
    return normalize_number(text)


def answers_match(prediction: str, reference: str) -> bool:
    """Whether a generated solution's final answer equals the reference's."""
    got, want = extract_answer(prediction), extract_answer(reference)
    if got is None or want is None:
        return False
    try:
        return abs(float(got) - float(want)) < 1e-6
    except ValueError:
        return got.strip() == want.strip()
