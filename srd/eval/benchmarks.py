"""Benchmarks by name: data, prompt, metric and decoding (docs/method.md, section 5).

instruction following  dolly-eval, self-inst, vicuna-eval, s-ni, unni (the paper's five) and any
                       JSONL file: ROUGE-L, sampling at temperature 1 over seeds 10..50 (or
                       greedy), 256 new tokens
summarisation          xsum, samsum-test: ROUGE-L, greedy, 128 new tokens
translation            iwslt17-en-de: corpus BLEU, greedy, 128 new tokens
math                   gsm8k-test: final-answer accuracy, chain-of-thought prompt, greedy
code                   mbpp: pass@1 of the generated function against the task's asserts
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from srd.data.example import DATA_SUFFIXES, Example

COT_SUFFIX = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Benchmark:
    name: str
    data: str  # data spec (named set or file)
    metric: str  # rouge_l | bleu | answer_match | pass_at_1
    sampling: bool  # True: temperature 1 over seeds; False: greedy
    max_new_tokens: int
    stop_strings: tuple[str, ...] = ("###",)


BENCHMARKS: dict[str, Benchmark] = {
    "dolly-eval": Benchmark("dolly-eval", "dolly-eval", "rouge_l", True, 256),
    "self-inst": Benchmark("self-inst", "self-inst", "rouge_l", True, 256),
    "vicuna-eval": Benchmark("vicuna-eval", "vicuna-eval", "rouge_l", True, 256),
    "s-ni": Benchmark("s-ni", "s-ni", "rouge_l", True, 256),
    "unni": Benchmark("unni", "unni", "rouge_l", True, 256),
    "xsum": Benchmark("xsum", "xsum", "rouge_l", False, 128),
    "samsum": Benchmark("samsum", "samsum-test", "rouge_l", False, 128),
    "iwslt17-en-de": Benchmark("iwslt17-en-de", "iwslt17-en-de", "bleu", False, 128),
    "gsm8k": Benchmark("gsm8k", "gsm8k-test", "answer_match", False, 1024),
    "mbpp": Benchmark("mbpp", "mbpp", "pass_at_1", False, 512),
}


def resolve_benchmark(spec: str) -> Benchmark:
    """A named benchmark, or a data file / named data set scored with ROUGE-L by sampling."""
    if spec in BENCHMARKS:
        return BENCHMARKS[spec]
    name = spec.rsplit("/", 1)[-1]
    name = next((name[: -len(x)] for x in DATA_SUFFIXES if name.lower().endswith(x)), name)
    return Benchmark(name, spec, "rouge_l", True, 256)


def prepare_example(bench: Benchmark, ex: Example) -> Example:
    """Task-specific prompt content (the prompt template itself is applied later)."""
    if bench.metric == "answer_match":
        return Example(
            id=ex.id, instruction=f"{ex.instruction}\n{COT_SUFFIX}", input=ex.input, output=ex.output, meta=ex.meta
        )
    if bench.metric == "pass_at_1":
        tests = ex.meta.get("test_list") or []
        shown = "\n".join(tests[:3])
        instruction = f"{ex.instruction}\nYour code should pass these tests:\n{shown}" if shown else ex.instruction
        return Example(id=ex.id, instruction=instruction, input=ex.input, output=ex.output, meta=ex.meta)
    return ex


def score_examples(bench: Benchmark, examples: Sequence[Example], predictions: Sequence[str]) -> list[float]:
    """Per-example scores (x100 for ROUGE-L; 0/100 for answers and tests; BLEU per sentence)."""
    from srd.metrics.answers import answers_match
    from srd.metrics.sandbox import defined_names, extract_code, run_tests
    from srd.metrics.text import corpus_bleu, rouge_l

    if bench.metric == "rouge_l":
        return [rouge_l(p, ex.references) for p, ex in zip(predictions, examples)]
    if bench.metric == "bleu":  # sentence-level for significance tests; the summary uses corpus BLEU
        return [corpus_bleu([p], [ex.references]) for p, ex in zip(predictions, examples)]
    if bench.metric == "answer_match":
        return [100.0 * answers_match(p, ex.target) for p, ex in zip(predictions, examples)]
    if bench.metric == "pass_at_1":
        out = []
        for p, ex in zip(predictions, examples):
            tests = list(ex.meta.get("test_list") or [])
            setup = ex.meta.get("test_setup_code") or ""
            names = defined_names(extract_code(ex.target))  # what the reference defines: the names its tests call
            out.append(
                100.0 * run_tests(extract_code(p), tests, setup=setup, entry_points=names).all_passed if tests else 0.0
            )
        return out
    raise ValueError(f"unknown metric {bench.metric!r}")


def aggregate(
    bench: Benchmark, examples: Sequence[Example], predictions: Sequence[str], scores: Sequence[float]
) -> float:
    """The benchmark's headline number for one seed."""
    from srd.metrics.text import corpus_bleu, mean

    if bench.metric == "bleu":
        return corpus_bleu(list(predictions), [ex.references for ex in examples])
    return mean(list(scores))


def describe(bench: Benchmark) -> dict[str, Any]:
    return {
        "data": bench.data,
        "metric": bench.metric,
        "sampling": bench.sampling,
        "max_new_tokens": bench.max_new_tokens,
    }
