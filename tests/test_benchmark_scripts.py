"""benchmarks/throughput.py and benchmarks/generation.py run end to end on tiny models."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tests.test_data import needs_shared

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_shared
def test_throughput_script_compares_naive_and_srd(tmp_path, tiny_models):
    record = tmp_path / "throughput.md"
    args = ["--preset", "cpu", "--steps", "1", "--batch", "2", "--seq", "64", "--record", str(record)]
    args += ["--impls", "naive", "srd", "srd-keep", "srd-keep-cache", "trl"]  # -compile: minutes on a CPU
    args += ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    assert _module("throughput").main(args) == 0
    text = record.read_text()
    assert "| naive |" in text and "| srd |" in text and "| trl |" in text and "1.00x" in text
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert all(float(rows[impl].split("|")[3]) > 0 for impl in ("naive", "srd", "srd-keep", "srd-keep-cache", "trl"))
    assert "Teacher top-64 cache of the batch, built once" in text and "srd-keep-cache" in text


@needs_shared
def test_throughput_dtypes_compare_each_precision_with_naive(tmp_path, tiny_models):
    record = tmp_path / "throughput.md"
    args = ["--preset", "cpu", "--steps", "1", "--batch", "2", "--seq", "64", "--record", str(record)]
    args += ["--impls", "naive", "srd-keep", "srd-keep-lp16", "--dtypes", "float32", "bf16"]
    args += ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    module = _module("throughput")
    if not module._native_bf16():  # refused with the reason, not run on a slow emulated path
        with pytest.raises(SystemExit):
            module.main(args)
        return
    assert module.main(args) == 0
    text = record.read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    assert {"naive @ float32", "naive @ bf16", "srd-keep @ float32", "srd-keep @ bf16", "srd-keep-lp16 @ bf16"} <= set(
        rows
    )
    assert rows["naive @ float32"][4].strip() == "1.00x" and rows["naive @ bf16"][8].strip() == "1.00x / 1.00x"
    assert all(float(r[7]) > 0 for label, r in rows.items() if " @ " in label)  # the step's own tensor peak
    assert "vs naive @ float32" in text and "student under bf16 autocast" in text


_PHASES = ("teacher forward", "student forward + loss", "backward", "optimizer")


@needs_shared
def test_throughput_profile_splits_the_step_into_phases(tmp_path, tiny_models):
    record = tmp_path / "profile.md"
    args = ["--preset", "cpu", "--steps", "1", "--batch", "2", "--seq", "64", "--record", str(record), "--profile"]
    args += ["--impls", "naive", "srd-keep"]
    args += ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    assert _module("throughput").main(args) == 0
    text = record.read_text()
    for impl in ("naive", "srd-keep"):
        section = text.split(f"## {impl}:")[1].split("## ")[0]
        cells = [r.split("|") for r in section.splitlines() if r.startswith("| ")]
        phases = {c[1].strip(): float(c[2]) for c in cells if c[1].strip() in _PHASES}
        assert sorted(phases) == sorted(_PHASES) and all(t > 0 for t in phases.values())
        assert "`aten::" in section  # the operators taking the time


def test_loss_only_times_forward_kl_and_the_fused_ce(tmp_path):
    import argparse

    record = tmp_path / "loss.md"
    args = argparse.Namespace(preset="cpu", record=str(record))
    assert _module("throughput").loss_benchmark(args, chunk=16, vocab=50, repeats=1) == 0
    rows = [r.split("|") for r in record.read_text().splitlines() if r.startswith("| 1 |") or r.startswith("| 2 |")]
    # times round to 0.000 s at this size; the speed-up is a ratio of the unrounded times
    # one table for forward KL (hand-written vs autograd), one for KL + CE (separate vs fused),
    # one for the fused loss from bf16 logits (upcast first vs kept as bf16)
    # ... and one for the teacher-cache path (autograd vs student_buckets_with_ce)
    assert len(rows) == 8 and all(float(r[4].strip().rstrip("x")) > 0 for r in rows)
    errors = [float(e) for r in rows[:4] for e in r[5].split("/")]  # difference, or errors vs float64
    assert len(errors) == 6 and all(0 <= e < 1e-5 for e in errors)
    assert "forward_kl_with_ce" in record.read_text()
    kept = [[float(x) for x in r[5].split("/")] for r in rows[4:6]]  # bytes held for backward
    assert all(bf16 < upcast for upcast, bf16 in kept) and all(0 <= float(r[6]) < 0.05 for r in rows[4:6])
    sparse_errors = [float(e) for r in rows[6:] for e in r[5].split("/")]
    assert len(sparse_errors) == 4 and all(0 <= e < 1e-5 for e in sparse_errors)


@needs_shared
def test_generation_script_compares_backends(tmp_path, tiny_models):
    record = tmp_path / "generation.md"
    args = ["--preset", "cpu", "--model", str(tiny_models["llama-student"]), "--limit", "4", "--batch-sizes", "2"]
    args += ["--max-new-tokens", "4", "--record", str(record), "--backends", "hf", "loop", "static", "loop-unpacked"]
    args += ["--phases"]
    assert _module("generation").main(args) == 0
    text = record.read_text()
    assert "## Profile" not in text
    assert "| 2 | loop-unpacked |" in text and "greedy answers identical between loop and loop-unpacked" in text
    assert _module("generation").main([*args, "--profile"]) == 0
    profiled = record.read_text()
    for backend in ("hf", "loop", "static"):
        section = profiled.split(f"## Profile: batch 2, {backend}")[1].split("## ")[0]
        assert "torch operators' own host time" in section and "| operator (self host time) |" in section
        assert "`aten::" in section
    assert "Batch 2, loop, forward passes by kind: prefill" in text and " steps (mean " in text
    assert "Weight-reading limit: a step reads " in text and "% of that limit" in text
    assert "| static |" in text and "identical between hf and static" in text
    assert "| 2 | hf |" in text and "| 2 | loop |" in text and "greedy answers identical" in text


@needs_shared
def test_generation_script_compares_precisions(tmp_path, tiny_models):
    record = tmp_path / "generation.md"
    args = ["--preset", "cpu", "--model", str(tiny_models["llama-student"]), "--limit", "4", "--batch-sizes", "2"]
    args += ["--max-new-tokens", "4", "--record", str(record), "--backends", "hf", "loop"]
    args += ["--dtypes", "float32", "bf16"]  # throughput.py's spelling, taken as bfloat16
    assert _module("generation").main(args) == 0
    text = record.read_text()
    rows = {r.split("|")[2].strip(): r.split("|") for r in text.splitlines() if r.startswith("| 2 |")}
    assert set(rows) == {"hf float32", "loop float32", "hf bfloat16", "loop bfloat16"}
    assert rows["hf float32"][7].strip() == "1.00x" and "speed-up vs hf float32" in text
    assert all(0 <= float(r[8]) <= 100 for r in rows.values())  # ROUGE-L of the answers
    assert "Batch 2, loop: " in text and "greedy answers identical between float32 and bfloat16" in text


def test_eos_hazard_gives_the_asked_mean_length():
    gen = _module("generation")
    h = gen.eos_hazard(40.0, 256)
    rng = np.random.default_rng(0)
    lengths = np.minimum(rng.geometric(h, 200_000) - 1, 256)  # tokens before EOS
    assert abs(lengths.mean() - 40.0) < 0.5
    with pytest.raises(ValueError, match="between 0 and max_new_tokens"):
        gen.eos_hazard(300, 256)


@needs_shared
def test_generation_script_shortens_random_init_answers(tmp_path, tiny_models):
    """--answer-tokens: a model that never ends its answers is biased to end them after about
    the asked number of tokens; the record says so and gives the realised mean."""
    record = tmp_path / "generation.md"
    args = ["--preset", "gpu", "--model", str(tiny_models["llama-student"]), "--limit", "16", "--batch-sizes", "4"]
    args += ["--max-new-tokens", "48", "--answer-tokens", "6", "--record", str(record), "--backends", "loop"]
    assert _module("generation").main(args) == 0
    text = record.read_text()
    assert "Answer lengths: the EOS logit raised by" in text and "a mean of 6.0 answer tokens cut at 48" in text
    row = next(r.split("|") for r in text.splitlines() if r.startswith("| 4 | loop |"))
    assert 1 < float(row[5]) < 20  # mean answer tokens (48 without the bias)
    assert "speed-up" not in text and len(row) == 9 and 0 <= float(row[7]) <= 100  # no hf row: no ratio column


@needs_shared
def test_onpolicy_script_compares_per_micro_batch_and_one_stream(tmp_path, tiny_models):
    record = tmp_path / "onpolicy.md"
    args = ["--preset", "cpu", "--model", str(tiny_models["llama-student"]), "--micro-batches", "2", "--batch", "2"]
    args += ["--max-new-tokens", "4", "--repeats", "1", "--record", str(record), "--answer-tokens", "2"]
    assert _module("onpolicy").main(args) == 0
    text = record.read_text()
    assert "Answer lengths: the EOS logit raised by" in text and "a mean of 2.0 answer tokens cut at 4" in text
    assert "| per micro-batch |" in text and "| one stream per step |" in text and "1.00x" in text
    assert "4/4 sampled answers identical" in text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_gemm_script_records_decode_rows_head_and_step_shapes(tmp_path, dtype):
    import torch

    record = tmp_path / "gemm.md"
    assert _module("gemm").main(["--repeats", "1", "--dtype", dtype, "--record", str(record)]) == 0
    text = record.read_text()
    assert text.splitlines()[0].startswith(f"# {dtype.capitalize()} GEMM rates")
    rows = [r.split("|") for r in text.splitlines() if r.startswith("| 576 x 1536 |")]
    assert [int(r[2]) for r in rows] == [1, 4, 16, 64] and all(float(r[3]) > 0 for r in rows)
    assert "LM head 49152 x 576, 16 rows: F.linear" in text and "| 1536 x 576 x 49152 |" in text
    from srd.generation.packed import _ops_available

    bf16 = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    if _ops_available() and (dtype == "float32" or bf16):  # the same products with the weights packed for oneDNN
        assert all(float(r[5]) > 0 and r[6].strip().endswith("x") for r in rows) and "packed for oneDNN" in text
        assert all(r[7].strip() in ("yes", "no") for r in rows)
    else:
        assert all(r[5].strip() == "-" for r in rows) and "packed for oneDNN" not in text


def test_sampling_script_records_the_three_samplers(tmp_path):
    record = tmp_path / "sampling.md"
    args = ["--rows", "2", "5", "--vocab", "300", "--repeats", "1", "--draws", "200", "--record", str(record)]
    assert _module("sampling").main(args) == 0
    text = record.read_text()
    rows = [r.split("|") for r in text.splitlines() if r.startswith(("| 2 |", "| 5 |"))]
    assert len(rows) == 2 and all(float(r[c]) > 0 for r in rows for c in (2, 3, 4))
    assert "Draws changed by 1e-5 logit noise (one seed per draw, 200 draws): sample_rows " in text


def test_record_header_elides_note_paragraphs():
    from benchmarks.common import command_line

    argv = ["benchmarks/quality.py", "--preset", "cpu", "--note", "A long paragraph.", "--note", "More."]
    assert command_line(argv) == "python benchmarks/quality.py --preset cpu --note '...' --note '...'"


def test_a_record_never_replaces_another_commands_record_nor_an_edited_one(tmp_path, monkeypatch, capsys):
    from benchmarks import common

    monkeypatch.setattr(common, "ROOT", tmp_path)
    monkeypatch.setattr(common.sys, "argv", ["benchmarks/quality.py", "--preset", "cpu"])

    def write(body: str) -> Path:
        return common.save_record("\n".join([*common.header("Quality"), body]) + "\n", None, "cpu", "quality")

    first = write("first run")
    assert first.parent == tmp_path / "benchmarks" / "results" and first.name.endswith("-cpu-quality.md")
    # the same command again, or with --report-only after the run, rewrites its own record
    monkeypatch.setattr(common.sys, "argv", ["benchmarks/quality.py", "--preset", "cpu", "--report-only"])
    assert write("first run, rewritten") == first and "rewritten" in first.read_text()
    # another command the same day gets the next free name; the first record stays as it was
    monkeypatch.setattr(common.sys, "argv", ["benchmarks/quality.py", "--preset", "cpu", "--seeds", "7"])
    second = write("second run")
    assert second.name == first.name.replace(".md", "-2.md") and "rewritten" in first.read_text()
    # a record edited by hand since it was written (notes added) is left as it is, even by its
    # own command: the rewrite goes beside it, and stderr says where and why
    monkeypatch.setattr(common.sys, "argv", ["benchmarks/quality.py", "--preset", "cpu"])
    first.write_text(first.read_text() + "\n## Notes\n\nBy hand.\n")
    edited = first.read_text()
    capsys.readouterr()
    third = write("first run, once more")
    assert third.name == first.name.replace(".md", "-3.md") and first.read_text() == edited
    assert "was edited since it was written; it is left as it is" in capsys.readouterr().err
    # a rerun of that command rewrites its own untouched record (-3), not the edited one
    assert write("first run, a fourth time") == third and "fourth" in third.read_text()
    # a file that is no record, given as --record or in the default's place, is not replaced either
    hand = tmp_path / "benchmarks" / "results" / "notes.md"
    hand.write_text("my notes\n")
    assert common.default_record_path("notes", "python x.py") == hand.with_name("notes-2.md")
    assert common.save_record("x\n", str(hand), "cpu", "quality") == hand.with_name("notes-2.md")
    assert hand.read_text() == "my notes\n" and "is not a benchmark record" in capsys.readouterr().err


def test_pad_fraction_counts_padding_to_a_multiple_of_8():
    pad_fraction = _module("padding").pad_fraction
    lengths = [8, 8, 3, 16]
    assert pad_fraction(lengths, [[0, 1]]) == 0.0  # two full rows of 8
    assert pad_fraction(lengths, [[2]]) == 1 - 3 / 8  # 3 tokens padded to 8
    assert pad_fraction(lengths, [[0, 3]]) == 1 - 24 / 32  # 8 + 16 tokens in 2 x 16
    assert abs(pad_fraction(lengths, [[0, 3], [1, 2]]) - (1 - 35 / 48)) < 1e-12


def test_padding_script_shows_bucketing_pads_less(tmp_path, tiny_data, tiny_models):
    record = tmp_path / "padding.md"
    args = ["--data", str(tiny_data["train"]), "--tokenizer", str(tiny_models["llama-student"])]
    args += ["--batch-sizes", "2", "--record", str(record)]
    assert _module("padding").main(args) == 0
    row = next(line for line in record.read_text().splitlines() if line.startswith("| 2 |"))
    random_pad, bucketed_pad = (float(c.strip().rstrip("%")) for c in row.split("|")[2:4])
    assert 0 <= bucketed_pad <= random_pad < 100


def test_multiprocess_script_compares_one_and_two_processes(tmp_path, tiny_models, tiny_data):
    """benchmarks/process_count.py: a 2-process DDP run against the 1-process reference, on tiny models."""
    record = tmp_path / "multiprocess.md"
    args = ["--preset", "cpu", "--runs", "ddp", "--out", str(tmp_path / "runs"), "--record", str(record)]
    args += ["--port", "29571", f"model.teacher={tiny_models['llama-teacher']}"]
    args += [f"model.student={tiny_models['llama-student']}", f"data.train={tiny_data['train']}"]
    args += [f"data.dev={tiny_data['dev']}", "data.max_len=96", "data.max_prompt_len=64", "train.batch_size=2"]
    assert _module("process_count").main(args) == 0
    lines = record.read_text().splitlines()
    rows = [line.split("|") for line in lines if line.startswith(("| 1 process", "| 2 processes"))]
    assert [r[1].strip() for r in rows] == ["1 process (reference)", "2 processes, DDP"]
    loss_diff, norm_diff, weight_diff = (float(rows[1][i]) for i in (3, 4, 5))
    assert loss_diff < 1e-5 and norm_diff < 1e-4 and weight_diff < 1e-5  # the same steps
    assert float(rows[0][2]) >= 0 and float(rows[1][6]) > 0  # a step time, a peak memory


@needs_shared
def test_throughput_rounds_and_against_another_checkout(tmp_path, tiny_models):
    """--rounds interleaves repeated runs and reports each round; --against runs the srd rows with
    another checkout's package too (checked to be the one imported), naive only once per round."""
    import shutil

    other = tmp_path / "before"
    shutil.copytree(ROOT / "srd", other / "srd", ignore=shutil.ignore_patterns("__pycache__"))
    record = tmp_path / "throughput.md"
    args = ["--preset", "cpu", "--steps", "1", "--batch", "2", "--seq", "64", "--record", str(record)]
    args += ["--impls", "naive", "srd-keep", "--rounds", "2", "--against", str(other)]
    args += ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    module = _module("throughput")
    assert module.main(args) == 0
    text = record.read_text()
    rows = {line.split("|")[1].strip(): line.split("|") for line in text.splitlines() if line.startswith("| ")}
    assert set(rows) == {"implementation", "naive", "srd-keep", "srd-keep (before)"}
    assert all(len(rows[k][8].split(",")) == 2 for k in ("naive", "srd-keep", "srd-keep (before)"))  # 2 rounds
    assert f"ran srd's code from `{other.resolve()}`" in text and "in each of 2 rounds" in text
    with pytest.raises(SystemExit):
        module.main([*args[:-2], "--against", str(tmp_path / "nothing")])


def test_sigterm_stops_a_benchmark_instead_of_ending_it():
    """Inside sigterm_stops a SIGTERM (gpu.sh's `timeout`) raises Stopped, so a benchmark can record
    what it finished; outside, the previous handler is back."""
    import os
    import signal

    from benchmarks.common import Stopped, sigterm_stops

    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Stopped), sigterm_stops():
        os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGTERM) is before


@needs_shared
def test_throughput_stopped_by_sigterm_records_the_finished_rows(tmp_path, tiny_models, monkeypatch):
    """A SIGTERM during the second implementation: the first one's row is recorded, the rest named."""
    from benchmarks.common import Stopped

    module = _module("throughput")
    real, calls = module._run_one, []

    def run_one(*args, **kwargs):
        calls.append(args[4])
        if len(calls) == 2:
            raise Stopped
        return real(*args, **kwargs)

    monkeypatch.setattr(module, "_run_one", run_one)
    record = tmp_path / "throughput.md"
    args = ["--preset", "cpu", "--steps", "1", "--batch", "2", "--seq", "64", "--record", str(record)]
    args += ["--impls", "naive", "srd", "srd-keep"]
    args += ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    assert module.main(args) == 0
    text = record.read_text()
    assert "| naive |" in text and "| srd |" not in text
    assert "stopped by SIGTERM (a time limit) before: srd, srd-keep" in text


@needs_shared
def test_teacher_store_script_records_size_reuse_fidelity_integrity_and_memory(tmp_path, tiny_models):
    record = tmp_path / "store.md"
    args = ["--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"])]
    args += ["--rows", "6", "--k", "8", "--batch", "3", "--steps", "1", "--record", str(record)]
    assert _module("teacher_store").main(args) == 0
    text = record.read_text()
    assert "| rows built, second run (same rows, another order) | 0 in" in text
    assert "bytes per target position | **" in text and "| 1.5 |" in text
    assert "the copy as made: no damaged file" in text and "1 damaged file(s) named" in text
    assert "| store: the student alone |" in text and "Peak memory saved" in text


def test_a_decode_step_reads_every_weight_once_and_an_untied_embedding_not_at_all():
    """The weight-reading limit's bytes: all parameters in the decode precision; an input
    embedding that is also the output layer once, one that is not, not at all (a step gathers
    only its rows)."""
    import torch

    from tests.conftest import make_llama

    gen = _module("generation")
    tied = make_llama(100, layers=1)
    n = sum(p.numel() for p in tied.parameters())
    assert gen.step_weight_bytes(tied, torch.bfloat16) == 2 * n
    assert gen.step_weight_bytes(tied, torch.float32) == 4 * n
    untied = make_llama(100, layers=1)
    untied.lm_head.weight = torch.nn.Parameter(untied.lm_head.weight.detach().clone())
    emb = untied.get_input_embeddings().weight.numel()
    assert gen.step_weight_bytes(untied, torch.bfloat16) == 2 * (sum(p.numel() for p in untied.parameters()) - emb)


def test_dev_noise_scores_each_model_under_each_nuisance_setting(tmp_path, tiny_models, monkeypatch):
    """dev_noise.py on tiny models: a row per setting (greedy per batch size, float32, a sampled
    seed each), each model's spread, and the second model's difference from the first. (Tiny
    models score 0 ROUGE-L against real references, so the score here is the answer's length.)"""
    import json

    import srd.metrics.text

    monkeypatch.setattr(srd.metrics.text, "rouge_l", lambda answer, refs: float(len(answer)))

    from srd.config import dump_config, load_config
    from tests.conftest import ROWS

    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    config = tmp_path / "config.yaml"
    overrides = [f"data.dev={dev}", "data.dev_limit=4", "dev_eval.num_examples=3", "dev_eval.max_new_tokens=4"]
    config.write_text(dump_config(load_config(None, [*overrides, "generation.dtype=bfloat16"])))
    record = tmp_path / "noise.md"
    student, teacher = tiny_models["llama-student"], tiny_models["llama-teacher"]
    args = ["--config", str(config), "--models", f"a={student}", f"b={teacher}", "--batch-sizes", "1", "3"]
    assert _module("dev_noise").main([*args, "--seeds", "5", "6", "--record", str(record)]) == 0
    text = record.read_text()
    for setting in ("greedy, bfloat16, batch 1", "greedy, bfloat16, batch 3", "greedy, float32, batch 1"):
        assert f"| {setting} |" in text
    assert "| sampled T = 1, seed 5 |" in text and "| sampled T = 1, seed 6 |" in text
    assert "3 dev rows of" in text and "| a |" in text and "| b |" in text and "Each model minus `a`" in text
    table = [r.split(" | ") for r in text.splitlines() if r.startswith(("| greedy", "| sampled"))]
    minus = next(r for r in text.splitlines() if r.startswith("| b | ") and "of 5 |" in r).split(" | ")[1:-1]
    assert len(table) == len(minus) == 5 and any(float(d) for d in minus)
    for row, d in zip(table, minus):  # b minus a, setting by setting
        assert float(d) == pytest.approx(float(row[2].rstrip(" |")) - float(row[1]), abs=0.011)
    # the paired tests over dev rows: the first greedy setting, and each row's mean over the seeds
    paired = next(r for r in text.split("Paired over the 3 dev rows")[1].splitlines() if r.startswith("| b | "))
    greedy_cell, sampled_cell = paired.split(" | ")[1:3]
    assert float(greedy_cell.split(" [")[0]) == pytest.approx(float(minus[0]), abs=0.011)
    assert float(sampled_cell.split(" [")[0]) == pytest.approx((float(minus[3]) + float(minus[4])) / 2, abs=0.011)
    assert "], p = " in greedy_cell and "sampled, each row's mean over 2 seeds" in text
    with pytest.raises(SystemExit, match="label=model"):
        _module("dev_noise").main(["--config", str(config), "--models", str(student)])


def test_logged_machines_group_starts_per_machine_and_skip_broken_lines(tmp_path, monkeypatch):
    import json

    from benchmarks import common

    monkeypatch.setattr(common.sys, "argv", ["benchmarks/quality.py", "--preset", "cpu"])
    common.log_machine(tmp_path)
    first = json.loads((tmp_path / common.MACHINES_LOG).read_text())
    assert first["command"] == "python benchmarks/quality.py --preset cpu" and "cpu_malloc" in first
    other = dict(first, at="2030-01-02 03:04", cpu="Another CPU", cpu_malloc="default")
    with (tmp_path / common.MACHINES_LOG).open("a") as f:
        f.write(json.dumps(other) + "\n" + "{not json\n" + json.dumps(dict(other, at="2030-01-03 00:00")) + "\n")
    lines = common.logged_machines(tmp_path)
    assert len(lines) == 2 and lines[0].startswith(f"{first['at']} (1 start): python ")
    assert lines[1].startswith("2030-01-02 03:04 to 2030-01-03 00:00 (2 starts): ") and "cpu Another CPU" in lines[1]
    assert "command" not in lines[1] and common.logged_machines(tmp_path / "nowhere") == []
    # a record header from those runs names them; the writing process is labelled as only that
    head = "\n".join(common.header("T", runs=tmp_path, wrote_only=True))
    assert "Machine that wrote this record: " in head and head.count("\n- ") == 2
    assert "predate the log" in "\n".join(common.header("T", runs=tmp_path / "nowhere", wrote_only=True))


@needs_shared
def test_teacher_store_rows_script_records_neighbours_and_the_bf16_cast(tmp_path, tiny_models):
    """benchmarks/teacher_store_rows.py on a tiny teacher: both builds timed and compared, and
    rows built one at a time are the same in both stores (0 of the shared rows differ)."""
    record = tmp_path / "rows.md"
    args = ["--teacher", str(tiny_models["llama-teacher"]), "--rows", "9", "--k", "8", "--record", str(record)]
    assert _module("teacher_store_rows").main(args) == 0
    text = record.read_text()
    (alone,) = [line for line in text.splitlines() if line.startswith("| 1 | ")]
    assert alone.endswith(" | 0 of 3 | 0 | 0.0000 |") and any(line.startswith("| 4 | ") for line in text.splitlines())
    assert "teacher CE, bf16 by `model.to` (rotary frequencies rounded) |" in text
