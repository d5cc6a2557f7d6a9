"""`srd eval`, `srd compare` and `srd report` end to end on tiny models."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from srd.cli import main, parse_args
from srd.report import difference_cell, paired_difference, wilcoxon_p
from tests.conftest import run_cli_in_processes
from tests.test_srd_run import _args, srd_data  # noqa: F401  (fixture)


@pytest.fixture
def two_runs(tmp_path, tiny_models, srd_data):  # noqa: F811
    assert main(_args("run", tiny_models, srd_data, tmp_path / "kd", "method=baseline", "train.epochs=1")) == 0
    assert main(_args("run", tiny_models, srd_data, tmp_path / "srd")) == 0
    return tmp_path / "kd" / "x", tmp_path / "srd" / "x"


def test_eval_compare_report(tmp_path, two_runs, srd_data, capsys, caplog):  # noqa: F811
    kd, srd = two_runs
    caplog.set_level("WARNING")
    for run in (kd, srd):
        args = [
            "eval",
            str(run),
            "--benchmarks",
            str(srd_data["dev"]),
            "gsm8k",
            "--limit",
            "3",
            "--seeds",
            "10",
            "20",
            "--max-new-tokens",
            "5",
            "--batch-size",
            "2",
            "--no-progress",
            "--data-dir",
            str(tmp_path / "data"),
        ]
        (tmp_path / "data" / "gsm8k").mkdir(parents=True, exist_ok=True)
        (tmp_path / "data" / "gsm8k" / "test.jsonl").write_text(
            "".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"#### {i + 1}"}) + "\n" for i in range(3))
        )
        assert main(args) == 0
        out = run / "eval" / "sampled"
        summary = json.loads((out / "summary.json").read_text())
        assert set(summary["benchmarks"]) == {"dev", "gsm8k"}
        dev = summary["benchmarks"]["dev"]
        assert set(dev["per_seed"]) == {"seed-10", "seed-20"} and dev["n"] == 3
        assert summary["benchmarks"]["gsm8k"]["per_seed"].keys() == {"greedy"}  # math is greedy
        rows = [json.loads(x) for x in (out / "dev" / "seed-10.jsonl").read_text().splitlines()]
        assert len(rows) == 3 and all({"id", "prediction", "score"} <= set(r) for r in rows)
        assert (out / "summary.md").read_text().startswith("| benchmark |")
    # the dev rows are the runs' first training rows: said for each run's evaluation
    said = f"benchmark {srd_data['dev']}: 3 of its 3 rows are training rows too (prompt and reference)"
    assert caplog.text.count(said) == 2, caplog.text
    # rerunning reuses the finished files
    mtime = (srd / "eval" / "sampled" / "dev" / "seed-10.jsonl").stat().st_mtime
    assert main(args) == 0
    assert (srd / "eval" / "sampled" / "dev" / "seed-10.jsonl").stat().st_mtime == mtime
    # a run's own evaluation folder takes the run's model (named as --out too), and no other model:
    # srd compare and srd report would read those scores as the run's
    assert main([*args, "--out", str(srd / "eval" / "sampled")]) == 0
    kd_args = [str(kd) if a == str(srd) else a for a in args]
    capsys.readouterr()
    assert main([*kd_args, "--out", str(srd / "eval" / "sampled")]) == 2
    assert f"{srd / 'eval' / 'sampled'} is where run {srd} keeps its own scores" in capsys.readouterr().err
    assert main([*kd_args, "--out", str(srd / "eval" / "greedy")]) == 2 and not (srd / "eval" / "greedy").exists()
    assert (srd / "eval" / "sampled" / "dev" / "seed-10.jsonl").stat().st_mtime == mtime
    capsys.readouterr()
    assert main(["compare", str(kd), str(srd), "--out", str(tmp_path / "table.md")]) == 0
    table = capsys.readouterr().out
    assert "| run | dev | gsm8k | average |" in table and "Wilcoxon" in table and "p = " in table
    assert (tmp_path / "table.md").read_text() == "<!-- written by srd compare -->\n" + table
    assert "more than one machine" not in table  # both trained here
    # the KD run resumed on another machine: its train time is not this one's
    log = kd / "environment.jsonl"
    first = json.loads(log.read_text().splitlines()[0])
    other = {
        "cpu_isa": "AVX2" if first["cpu_isa"] != "AVX2" else "AVX512",
        "cpu_native_bf16": not first["cpu_native_bf16"],
    }
    log.write_text(log.read_text() + json.dumps({**first, **other}) + "\n")
    assert main(["compare", str(kd), str(srd)]) == 0
    table = capsys.readouterr().out
    assert f"The train times come from more than one machine (kd/x: cpu {first['cpu']}" in table
    said = f"cpu_isa {other['cpu_isa']}, cpu_native_bf16 {other['cpu_native_bf16']}"  # not this machine
    assert said in table and "they do not compare" in table
    assert main(["report", str(srd)]) == 0
    report = (srd / "report.md").read_text()
    for png in ("reflection_scores.png", "stage_sizes.png", "training.png", "schedule.png", "eval_sampled.png"):
        assert (srd / "report" / png).stat().st_size > 5000 and png in report
    assert "## Reflection" in report and "## Evaluation" in report


def test_overrides_after_a_list_flag_stay_overrides(capsys):
    # argparse alone would read eval.limit=5 as a benchmark, and after --seeds as a bad integer
    args = parse_args(["eval", "m", "eval.greedy=false", "--benchmarks", "dolly-eval", "eval.limit=5", "--seeds", "1"])
    assert args.overrides == ["eval.greedy=false", "eval.limit=5"]
    assert getattr(args, "eval.benchmarks") == ["dolly-eval"] and getattr(args, "eval.seeds") == [1]
    args = parse_args(["eval", "m", "--seeds", "-1", "2", "eval.limit=5", "--greedy"])
    assert getattr(args, "eval.seeds") == [-1, 2] and args.overrides == ["eval.limit=5"]
    args = parse_args(["prune", "--heal-data", "samsum", "xsum", "prune.layers=20", "--out", "s"])
    assert getattr(args, "prune.heal_data") == ["samsum", "xsum"] and args.overrides == ["prune.layers=20"]
    # a file name without a dotted key is still a benchmark; a swallowed plain word still fails as before
    args = parse_args(["eval", "m", "--benchmarks", "rows.jsonl", "mine=1.jsonl"])
    assert getattr(args, "eval.benchmarks") == ["rows.jsonl", "mine=1.jsonl"] and args.overrides == []
    with pytest.raises(SystemExit):
        parse_args(["eval", "m", "--seeds", "1", "x"])
    assert "invalid int value: 'x'" in capsys.readouterr().err


def test_compare_without_eval_is_a_clear_error(tmp_path, two_runs, capsys):
    kd, srd = two_runs
    assert main(["compare", str(kd), str(srd)]) == 2
    assert "srd eval" in capsys.readouterr().err


def test_wilcoxon_p():
    a = {str(i): float(i) for i in range(20)}
    assert wilcoxon_p(a, dict(a)) == (1.0, 20)
    better = {k: v + 1 + (int(k) % 3) for k, v in a.items()}
    p, n = wilcoxon_p(a, better)
    assert n == 20 and p < 0.001


def test_paired_difference_interval_and_words():
    import numpy as np

    rng = np.random.default_rng(0)
    a = {str(i): float(v) for i, v in enumerate(rng.uniform(0, 50, 300))}
    # b = a + 2 + noise: the interval holds the true mean shift and excludes 0
    noise = rng.normal(0, 5, 300)
    b = {k: v + 2.0 + noise[int(k)] for k, v in a.items()}
    d = paired_difference(a, b)
    true = float(np.mean([b[k] - a[k] for k in a]))
    assert d["n"] == 300 and abs(d["diff"] - true) < 1e-12
    assert d["low"] < true < d["high"] and d["low"] > 0 and d["significant"] and d["p"] < 1e-6
    assert paired_difference(a, b) == d  # seeded: the same interval every time
    assert "significant" in difference_cell(d) and "not significant" not in difference_cell(d)
    # pure noise around 0: not significant, and the cell says so in words
    c = {k: v + noise[int(k)] * 0.01 * (1 if int(k) % 2 else -1) for k, v in a.items()}
    d0 = paired_difference(a, c)
    assert d0["low"] < 0 < d0["high"] or not d0["significant"]
    assert difference_cell(paired_difference(a, dict(a))).endswith("p = 1, not significant")
    assert paired_difference({}, {})["n"] == 0 and difference_cell(paired_difference({}, {})) == "-"
    # tiny samples: no resampling, the interval collapses to the mean
    two = paired_difference({"x": 1.0, "y": 2.0}, {"x": 2.0, "y": 4.0})
    assert two["low"] == two["high"] == two["diff"] == 1.5


@pytest.mark.slow
def test_eval_sharded_over_two_processes_matches_one(tmp_path, tiny_models, srd_data):  # noqa: F811
    """Sampled answers are seeded per example: two processes give the one-process file."""

    def args(out, batch):
        return [
            "eval",
            str(tiny_models["llama-student"]),
            "--benchmarks",
            str(srd_data["train"]),
            "--seeds",
            "10",
            "--max-new-tokens",
            "4",
            "--batch-size",
            str(batch),
            "--no-progress",
            "--out",
            str(out),
        ]

    proc = run_cli_in_processes(args(tmp_path / "two", 1), port=29519)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert main(args(tmp_path / "one", 4)) == 0
    one = (tmp_path / "one" / "train" / "seed-10.jsonl").read_text()
    two = (tmp_path / "two" / "train" / "seed-10.jsonl").read_text()
    assert one == two and len(one.splitlines()) == 20


@pytest.mark.parametrize("seeds", [None, [10]], ids=["greedy", "sampled"])
def test_interrupted_evaluation_resumes_per_answer(tmp_path, tiny_models, srd_data, monkeypatch, seeds):  # noqa: F811
    """A benchmark killed after 2 answers keeps them (partial file); the rerun generates the
    block they belong to again (here all rows: one block), with another batch size, keeps the 2
    and ends with the uninterrupted predictions (sampled answers too: each example has its own
    seed)."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    model = load_model(str(tiny_models["llama-student"])).eval()
    tok = load_tokenizer(str(tiny_models["llama-student"]))
    acc = Accelerator(cpu=True)
    kw = dict(seeds=seeds, limit=None, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=3)
    key = "greedy" if seeds is None else "seed-10"
    kw.update(max_new_tokens=6, no_repeat_ngram_size=0, accelerator=acc, progress=False)
    bench = str(srd_data["dev"])
    ev.evaluate(model, tok, [bench], tmp_path / "whole", **kw)
    name = next(p for p in (tmp_path / "whole").iterdir() if p.is_dir()).name
    whole = (tmp_path / "whole" / name / f"{key}.jsonl").read_text()
    n = len(whole.splitlines())
    assert n >= 3

    real, given = ev.iter_responses, []

    def dies_after_two(*args, **kwargs):  # interrupted after two answers were kept
        for k, pair in enumerate(real(*args, **kwargs)):
            if k == 2:
                raise KeyboardInterrupt
            yield pair

    monkeypatch.setattr(ev, "iter_responses", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, tok, [bench], tmp_path / "cut", **kw)
    partial = tmp_path / "cut" / name / f"{key}.rank0.partial"
    assert len(partial.read_text().splitlines()) == 2 and not (tmp_path / "cut" / name / f"{key}.jsonl").exists()
    monkeypatch.setattr(
        ev, "iter_responses", lambda m, t, prompts, *a, **k: given.append(len(prompts)) or real(m, t, prompts, *a, **k)
    )
    ev.evaluate(model, tok, [bench], tmp_path / "cut", **{**kw, "batch_size": 2})
    assert given == [n]  # the cut block again, whole
    assert (tmp_path / "cut" / name / f"{key}.jsonl").read_text() == whole
    assert not partial.exists()


def test_work_blocks_cut_rows_by_count_and_process_only():
    from srd.generation import work_blocks

    assert work_blocks(10, size=4) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert work_blocks(10, 0, 2) == [[0, 1, 2, 3, 4]] and work_blocks(10, 1, 2) == [[5, 6, 7, 8, 9]]
    assert work_blocks(10, 1, 2, size=3) == [[3, 4, 5], [9]]  # blocks 1 and 3 of 0..3
    assert work_blocks(0) == [] and work_blocks(3, 2, 4) == [[2]] and work_blocks(3, 3, 4) == []


def test_a_resumed_evaluation_generates_the_cut_block_as_in_one_go(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """Rows are generated in blocks; a rerun skips finished blocks and generates the cut one
    again whole, with the very prompts, in the very order, of the uninterrupted run: the same
    batches, so the same answers in bf16 too (where a row's logits depend on its batch-mates)."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    import srd.generation.decode as decode
    from srd.models import load_model, load_tokenizer

    monkeypatch.setattr(decode, "WORK_BLOCK", 3)
    model = load_model(str(tiny_models["llama-student"])).eval()
    tok = load_tokenizer(str(tiny_models["llama-student"]))
    kw = dict(seeds=None, limit=8, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=2)
    kw.update(max_new_tokens=4, no_repeat_ngram_size=0, accelerator=Accelerator(cpu=True), progress=False)
    bench = str(srd_data["train"])  # 20 rows
    real, calls = ev.iter_responses, []

    def recorded(m, t, prompts, *a, **k):
        calls.append([list(p) for p in prompts])
        return real(m, t, prompts, *a, **k)

    monkeypatch.setattr(ev, "iter_responses", recorded)
    ev.evaluate(model, tok, [bench], tmp_path / "whole", **kw)
    whole, calls = calls, []
    assert [len(c) for c in whole] == [3, 3, 2]

    answered = []

    def dies(m, t, prompts, *a, **k):  # killed after 4 answers: block 1 done, block 2 cut
        for pair in real(m, t, prompts, *a, **k):
            if len(answered) == 4:
                raise KeyboardInterrupt
            answered.append(pair)
            yield pair

    monkeypatch.setattr(ev, "iter_responses", dies)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(model, tok, [bench], tmp_path / "cut", **kw)
    calls = []
    monkeypatch.setattr(ev, "iter_responses", recorded)
    ev.evaluate(model, tok, [bench], tmp_path / "cut", **kw)
    assert calls == whole[1:]  # block 2 whole again, then block 3: the uninterrupted run's prompts
    name = ev.resolve_benchmark(bench).name
    assert (tmp_path / "cut" / name / "greedy.jsonl").read_text() == (
        tmp_path / "whole" / name / "greedy.jsonl"
    ).read_text()


def test_answers_kept_by_other_processes_are_reused(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """Resuming with fewer processes: every process's partial file counts (rows are numbered in
    the dataset, not per process: the kept answer stays, its block is generated again whole);
    lines of the older per-process numbering are ignored (those answers are generated again);
    all partial files go once the results are saved."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    model = load_model(str(tiny_models["llama-student"])).eval()
    tok = load_tokenizer(str(tiny_models["llama-student"]))
    kw = dict(seeds=None, limit=4, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=3)
    kw.update(max_new_tokens=3, no_repeat_ngram_size=0, accelerator=Accelerator(cpu=True), progress=False)
    bench = str(srd_data["dev"])
    name = ev.resolve_benchmark(bench).name
    folder = tmp_path / "out" / name
    folder.mkdir(parents=True)
    (folder / "greedy.rank1.partial").write_text(
        json.dumps({"row": 1, "prediction": "kept by process 1", "s": 0.5})
        + "\n"
        + json.dumps({"i": 0, "prediction": "old numbering", "s": 0.5})
        + "\n"
    )
    real, given = ev.iter_responses, []
    monkeypatch.setattr(
        ev, "iter_responses", lambda m, t, prompts, *a, **k: given.append(len(prompts)) or real(m, t, prompts, *a, **k)
    )
    ev.evaluate(model, tok, [bench], tmp_path / "out", **kw)
    rows = [json.loads(x) for x in (folder / "greedy.jsonl").read_text().splitlines()]
    assert (
        given == [len(rows)]
        and rows[1]["prediction"] == "kept by process 1"
        and rows[0]["prediction"] != "old numbering"
    )
    assert not list(folder.glob("*.partial"))


def test_an_answer_kept_after_a_torn_line_starts_a_line_of_its_own(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """A kill tore the last line of the process's kept answers: the next answer kept must not be
    glued to it (it was, and was lost at the next resume)."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    spec = str(tiny_models["llama-student"])
    kw = dict(seeds=None, limit=4, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=4)
    kw.update(max_new_tokens=3, no_repeat_ngram_size=0, accelerator=Accelerator(cpu=True), progress=False)
    bench = str(srd_data["dev"])
    own = tmp_path / "out" / ev.resolve_benchmark(bench).name / "greedy.rank0.partial"
    own.parent.mkdir(parents=True)
    own.write_text('{"row": 0, "predic')
    real = ev.iter_responses

    def one_then_killed(*a, **k):
        yield next(iter(real(*a, **k)))
        raise KeyboardInterrupt

    monkeypatch.setattr(ev, "iter_responses", one_then_killed)
    with pytest.raises(KeyboardInterrupt):
        ev.evaluate(load_model(spec).eval(), load_tokenizer(spec), [bench], tmp_path / "out", **kw)
    assert [sorted(json.loads(line)) for line in own.read_text().splitlines()] == [["prediction", "row", "s"]]


def test_evaluation_folder_keeps_one_model(tmp_path, tiny_models, srd_data):  # noqa: F811
    """A folder with one model's answers refuses another model's (a run's best/ after its final/):
    the error names both and the ways on; the same model resumes, also from a moved run directory;
    a folder from before the record adopts the model that resumes it, keeping its precision."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    spec = str(tiny_models["llama-student"])
    tok, acc = load_tokenizer(spec), Accelerator(cpu=True)
    kw = dict(seeds=None, limit=2, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=2)
    kw.update(max_new_tokens=3, accelerator=acc, progress=False)
    bench, out = str(srd_data["dev"]), tmp_path / "eval"
    run = tmp_path / "run" / "stages" / "stage-3"
    for name in ("final", "best"):
        shutil.copytree(spec, run / name)
    ev.evaluate(load_model(spec).eval(), tok, [bench], out, model_name=str(run / "final"), **kw)
    record = json.loads((out / "decoding.json").read_text())
    assert record.pop("benchmarks").keys() == {"dev"}  # and each benchmark's decoding settings
    assert record == {"dtype": "float32", "model": "run/stages/stage-3/final", "fingerprint": record["fingerprint"]}
    with pytest.raises(ev.EvalError, match=r"holds the evaluation of run/stages/stage-3/final.*stage-3/best.*--out"):
        ev.evaluate(load_model(spec).eval(), tok, [bench], out, model_name=str(run / "best"), **kw)
    (tmp_path / "other").mkdir()  # another run's checkpoint of the same stage is another model
    shutil.copytree(tmp_path / "run", tmp_path / "other" / "run2")
    with pytest.raises(ev.EvalError, match=r"evaluates run2/stages/stage-3/final"):
        ev.evaluate(
            load_model(spec).eval(),
            tok,
            [bench],
            out,
            model_name=str(tmp_path / "other/run2/stages/stage-3/final"),
            **kw,
        )
    shutil.move(tmp_path / "run", tmp_path / "other" / "run")  # the same run, moved: resumes
    ev.evaluate(
        load_model(spec).eval(), tok, [bench], out, model_name=str(tmp_path / "other/run/stages/stage-3/final"), **kw
    )
    fp = {"fingerprint": json.loads((out / "decoding.json").read_text())["fingerprint"]}
    (out / "decoding.json").unlink()  # a folder from before either record
    ev.evaluate(load_model(spec).eval(), tok, [bench], out, model_name="some/hub-id", **kw)
    record = json.loads((out / "decoding.json").read_text())
    assert record.pop("benchmarks").keys() == {"dev"}
    assert record == {"dtype": "float32", "model": "some/hub-id", **fp}
    assert ev.model_key("some/hub-id") == "some/hub-id" and ev.model_key(spec) == "llama-student"


def test_two_models_with_one_name_never_share_scores(tmp_path, tiny_models, srd_data, monkeypatch, capsys):  # noqa: F811
    """`srd eval a/student` then `srd eval b/student` (other weights): each gets its own default
    folder and its own answers; the same --out for both is refused by the weights' fingerprint."""
    from srd.models import load_model

    monkeypatch.chdir(tmp_path)
    for run, spec in (("a", "llama-student"), ("b", "llama-teacher")):
        shutil.copytree(tiny_models[spec], tmp_path / run / "student")
    common = [
        "--benchmarks",
        str(srd_data["dev"]),
        "--greedy",
        "--limit",
        "2",
        "--max-new-tokens",
        "3",
        "--no-progress",
    ]
    for run in ("a", "b"):
        assert main(["eval", f"{run}/student", *common]) == 0
    folders = sorted((tmp_path / "runs" / "eval").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("student-") and f.name.endswith("-greedy") for f in folders)
    records = [json.loads((f / "decoding.json").read_text()) for f in folders]
    assert records[0]["fingerprint"] != records[1]["fingerprint"]
    assert main(["eval", "a/student", "--out", "shared", *common]) == 0
    capsys.readouterr()
    assert main(["eval", "b/student", "--out", "shared", *common]) == 2  # same name, other weights
    err = capsys.readouterr().err
    assert "Traceback" not in err and [line for line in err.splitlines() if "other weights" in line]
    # a folder retrained in place is another model too
    shutil.rmtree(tmp_path / "a" / "student")
    shutil.copytree(tiny_models["llama-teacher"], tmp_path / "a" / "student")
    assert main(["eval", "a/student", "--out", "shared", *common]) == 2
    assert load_model(str(tmp_path / "b" / "student")) is not None


def test_eval_of_a_run_checkpoint_goes_to_a_folder_named_by_its_run(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """`srd eval RUN/stages/stage-1/best` (no --out) writes runs/eval/<run>-stage-1-best-<mode>: two
    runs' best/ folders no longer share runs/eval/best-<mode>."""
    monkeypatch.chdir(tmp_path)
    for run in ("a", "b"):
        shutil.copytree(tiny_models["llama-student"], tmp_path / run / "stages" / "stage-1" / "best")
        args = ["eval", f"{run}/stages/stage-1/best", "--benchmarks", str(srd_data["dev"]), "--greedy"]
        assert main([*args, "--limit", "2", "--max-new-tokens", "3", "--no-progress"]) == 0
    assert sorted(p.name for p in (tmp_path / "runs" / "eval").iterdir()) == [
        "a-stage-1-best-greedy",
        "b-stage-1-best-greedy",
    ]


def test_evaluation_folder_keeps_one_precision(tmp_path, tiny_models, srd_data):  # noqa: F811
    """Answers decoded with float32 weights are not resumed with bf16 ones (or back): the error
    names the folder and both ways on; the same precision resumes; `srd eval --dtype` decodes
    with bf16 weights and says so in the folder."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    spec = str(tiny_models["llama-student"])
    tok, acc = load_tokenizer(spec), Accelerator(cpu=True)
    kw = dict(seeds=None, limit=2, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=2)
    kw.update(max_new_tokens=3, accelerator=acc, progress=False)
    bench, out = str(srd_data["dev"]), tmp_path / "eval"
    ev.evaluate(load_model(spec).eval(), tok, [bench], out, **kw)
    record = json.loads((out / "decoding.json").read_text())
    assert record.pop("benchmarks").keys() == {"dev"}
    assert record == {"dtype": "float32", "fingerprint": record["fingerprint"]}
    with pytest.raises(ev.EvalError, match=r"decoded with float32 weights.*eval.dtype=float32.*--out"):
        ev.evaluate(load_model(spec, dtype=torch.bfloat16).eval(), tok, [bench], out, **kw)
    ev.evaluate(load_model(spec).eval(), tok, [bench], out, **kw)  # same precision: resumes
    (out / "decoding.json").unlink()  # a folder from before generation.dtype: float32 answers
    with pytest.raises(ev.EvalError, match="decoded with float32 weights"):
        ev.evaluate(load_model(spec, dtype=torch.bfloat16).eval(), tok, [bench], out, **kw)

    bf = tmp_path / "bf16"
    args = ["eval", spec, "--benchmarks", bench, "--greedy", "--limit", "2", "--max-new-tokens", "3"]
    assert main([*args, "--out", str(bf), "--dtype", "bfloat16", "--no-progress"]) == 0
    record = json.loads((bf / "decoding.json").read_text())
    assert record.pop("benchmarks").keys() == {ev.resolve_benchmark(bench).name}
    assert record == {"dtype": "bfloat16", "model": "llama-student", "fingerprint": record["fingerprint"]}
    assert main([*args, "--out", str(bf), "--no-progress"]) == 2  # float32 into a bf16 folder: refused


def test_eval_takes_config_keys_like_the_other_commands(tmp_path, tiny_models, srd_data):  # noqa: F811
    """`srd eval` reads the eval / data / generation sections: key=value overrides, a recipe
    (--config) and the flags (aliases of those keys) give the same answers; an unknown key is an
    error that lists the valid ones."""
    spec, bench = str(tiny_models["llama-student"]), str(srd_data["dev"])
    flags = ["--benchmarks", bench, "--greedy", "--limit", "2", "--max-new-tokens", "3", "--no-progress"]
    assert main(["eval", spec, *flags, "--out", str(tmp_path / "flags")]) == 0
    keys = [f"eval.benchmarks=[{bench}]", "eval.greedy=true", "eval.limit=2", "eval.max_new_tokens=3"]
    assert main(["eval", spec, *keys, "--out", str(tmp_path / "keys"), "--no-progress"]) == 0
    recipe = tmp_path / "eval.yaml"
    recipe.write_text(f"eval:\n  benchmarks: [{bench}]\n  greedy: true\n  limit: 4\n  max_new_tokens: 3\n")
    # the command line's overrides win over the recipe
    args = ["eval", spec, "eval.limit=2", "--config", str(recipe), "--out", str(tmp_path / "recipe"), "--no-progress"]
    assert main(args) == 0
    answers = [
        [json.loads(line)["prediction"] for line in (tmp_path / d / "dev" / "greedy.jsonl").read_text().splitlines()]
        for d in ("flags", "keys", "recipe")
    ]
    assert len(answers[0]) == 2 and answers[0] == answers[1] == answers[2]
    assert main(["eval", spec, "eval.nope=1", "--out", str(tmp_path / "bad")]) == 2


def _eval_output(folder, sampling: bool, scores: dict[str, float]):
    """An `srd eval` output folder: summary.json and one benchmark's per-example file."""
    (folder / "dolly-eval").mkdir(parents=True)
    name = "seed-10.jsonl" if sampling else "greedy.jsonl"
    rows = [{"id": k, "prediction": "x", "score": v} for k, v in scores.items()]
    (folder / "dolly-eval" / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    mean = sum(scores.values()) / len(scores)
    bench = {"data": "dolly-eval", "mean": mean, "n": len(scores), "sampling": sampling, "max_new_tokens": 128}
    (folder / "summary.json").write_text(json.dumps({"benchmarks": {"dolly-eval": bench}}))
    return folder


def test_compare_takes_srd_eval_output_folders_and_refuses_unlike_decodings(tmp_path, capsys):
    """`srd eval MODEL --out DIR` folders compare directly (two folders of one name are told apart
    by their parents); a greedy folder set against a sampled one is refused, not tabled."""
    ids = [f"r{i}" for i in range(12)]
    a = _eval_output(tmp_path / "a" / "sampled", True, {k: 10.0 + i for i, k in enumerate(ids)})
    b = _eval_output(tmp_path / "b" / "sampled", True, {k: 12.0 + i for i, k in enumerate(ids)})
    assert main(["compare", str(a), str(b)]) == 0
    table = capsys.readouterr().out
    assert "| a/sampled | 15.50 |" in table and "| b/sampled | +2.00 [+2.00, +2.00]" in table
    greedy = _eval_output(tmp_path / "c" / "greedy", False, {k: 11.0 for k in ids})
    assert main(["compare", str(a), str(greedy)]) == 2
    err = capsys.readouterr().err
    assert "dolly-eval was decoded differently" in err and "(sampled: sampled, 128 new tokens; greedy: greedy" in err
    fewer = _eval_output(tmp_path / "d" / "sampled", True, {k: 12.0 for k in ids[:6]})  # eval.limit=6
    assert main(["compare", str(a), str(fewer)]) == 2
    assert "dolly-eval was evaluated with another number of rows (eval.limit) in the compared runs" in (
        capsys.readouterr().err
    )
    settings = {"n": 12, "rows": "ab" * 32, "prompt_format": "alpaca", "max_prompt_len": 256}
    for folder, fmt in ((a, "alpaca"), (b, "chat")):  # recorded by srd eval since decoding.json holds them
        record = {"benchmarks": {"dolly-eval": {**settings, "prompt_format": fmt}}}
        (folder / "decoding.json").write_text(json.dumps(record))
    assert main(["compare", str(a), str(b)]) == 2
    assert "another prompt format (data.prompt_format) in the compared runs (a/sampled: alpaca; b/sampled: chat)" in (
        capsys.readouterr().err
    )
    (b / "decoding.json").unlink()  # a folder from before the record: only what both recorded is compared
    assert main(["compare", str(a), str(b)]) == 0
    assert "different precisions" not in capsys.readouterr().out
    # weights decoded in two precisions: tabled (each score is its model's own), and said
    for folder, dtype in ((a, "float32"), (b, "bfloat16")):
        (folder / "decoding.json").write_text(json.dumps({"dtype": dtype, "benchmarks": {"dolly-eval": settings}}))
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert "different precisions (a/sampled: float32; b/sampled: bfloat16)" in out and "same weights" not in out
    # two folders of one model's weights (a copy, or one model evaluated twice): said under the table
    for folder, fingerprint in ((a, "4db58eb0ebf0990d"), (b, "4db58eb0ebf0990d")):
        (folder / "decoding.json").write_text(
            json.dumps({"fingerprint": fingerprint, "benchmarks": {"dolly-eval": settings}})
        )
    assert main(["compare", str(a), str(b)]) == 0
    assert "a/sampled and b/sampled are evaluations of the same weights (fingerprint 4db58eb0ebf0990d)" in (
        capsys.readouterr().out
    )


def test_compare_names_a_listed_answer_file_that_is_gone_in_one_line(tmp_path, capsys):
    """A per-example file that summary.json lists but that was removed: one line naming it and the
    fix, exit 2; a stray file beside the answers changes nothing."""
    ids = [f"r{i}" for i in range(6)]
    a = _eval_output(tmp_path / "a", True, {k: 10.0 + i for i, k in enumerate(ids)})
    b = _eval_output(tmp_path / "b", True, {k: 11.0 + i for i, k in enumerate(ids)})
    for folder in (a, b):
        summary = json.loads((folder / "summary.json").read_text())
        summary["benchmarks"]["dolly-eval"]["per_seed"] = {"seed-10": 0.0}
        (folder / "summary.json").write_text(json.dumps(summary))
    (b / "dolly-eval" / "seed-10 (copy).jsonl").write_text(json.dumps({"id": "r0", "score": 99.0}) + "\n")
    assert main(["compare", str(a), str(b)]) == 0
    assert "| b | +1.00 [+1.00, +1.00]" in capsys.readouterr().out
    (b / "dolly-eval" / "seed-10.jsonl").unlink()
    assert main(["compare", str(a), str(b)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "seed-10.jsonl is missing" in err and "rerun `srd eval`" in err


def test_compare_out_replaces_only_a_table_it_wrote(tmp_path, capsys):
    """--out writes a new file and replaces its own table on a rerun; a file of the user's at that
    path (or a folder) is refused in one line and left as it was."""
    ids = [f"r{i}" for i in range(6)]
    a = _eval_output(tmp_path / "a", True, {k: 10.0 + i for i, k in enumerate(ids)})
    b = _eval_output(tmp_path / "b", True, {k: 11.0 + i for i, k in enumerate(ids)})
    out = tmp_path / "table.md"
    assert main(["compare", str(a), str(b), "--out", str(out)]) == 0
    assert main(["compare", str(b), str(a), "--out", str(out)]) == 0  # its own table: replaced
    assert out.read_text().splitlines()[3].startswith("| b | 13.50 |")  # b first now
    notes = tmp_path / "notes.md"
    notes.write_text("my notes\n")
    capsys.readouterr()
    assert main(["compare", str(a), str(b), "--out", str(notes)]) == 2
    err = capsys.readouterr().err
    assert "notes.md already exists and srd compare did not write it" in err and len(err.strip().splitlines()) == 1
    assert notes.read_text() == "my notes\n"
    assert main(["compare", str(a), str(b), "--out", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err


def test_an_evaluation_folder_keeps_one_decoding_per_benchmark(tmp_path, tiny_models, srd_data, monkeypatch):  # noqa: F811
    """Answers decoded (or kept, from an interrupted decoding) with one token budget, prompt
    format, decoding or set of rows are never reused and reported under another: the rerun is
    refused, naming what changed; the same settings resume. A folder from before the record is
    checked against its summary."""
    from accelerate import Accelerator

    import srd.eval.evaluate as ev
    from srd.models import load_model, load_tokenizer

    spec = str(tiny_models["llama-student"])
    model, tok = load_model(spec).eval(), load_tokenizer(spec)
    bench = tmp_path / "bench.jsonl"
    rows = [{"instruction": f"Say {w}.", "output": f"{w}."} for w in ("hi", "yes", "no")]
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    kw = dict(seeds=None, limit=2, data_dir=None, fmt="alpaca", max_prompt_len=64, batch_size=2)
    kw.update(max_new_tokens=3, no_repeat_ngram_size=0, accelerator=Accelerator(cpu=True), progress=False)
    out = tmp_path / "eval"

    def run(**changes):
        return ev.evaluate(model, tok, [str(bench)], out, **{**kw, **changes})

    real = ev.iter_responses

    def dies(*a, **k):  # interrupted after one kept answer
        for pair in real(*a, **k):
            yield pair
            raise KeyboardInterrupt

    monkeypatch.setattr(ev, "iter_responses", dies)
    with pytest.raises(KeyboardInterrupt):
        run()
    monkeypatch.setattr(ev, "iter_responses", real)
    with pytest.raises(
        ev.EvalError, match=r"bench holds answers decoded with other settings \(max_new_tokens 3, now 5\)"
    ):
        run(max_new_tokens=5)  # the kept answer had a 3-token budget
    first = run()["benchmarks"]["bench"]
    assert first["n"] == 2 and first["max_new_tokens"] == 3
    for changes, what in [
        (dict(max_new_tokens=5), "max_new_tokens 3, now 5"),
        (dict(seeds=[1]), "sampling False, now True"),
        (dict(limit=3), "n 2, now 3"),
        (dict(fmt="plain"), "prompt_format 'alpaca', now 'plain'"),
        (dict(no_repeat_ngram_size=2), "no_repeat_ngram_size 0, now 2"),
    ]:
        with pytest.raises(ev.EvalError, match=re.escape(what) + r".*srd eval --out.*delete"):
            run(**changes)
    rows[0]["output"] = "hello."  # the file edited, the count kept
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ev.EvalError, match=r"the rows \(the benchmark file changed\)"):
        run()
    rows[0]["output"] = "hi."
    bench.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert run()["benchmarks"]["bench"]["per_seed"] == first["per_seed"]
    record = json.loads((out / "decoding.json").read_text())
    del record["benchmarks"]  # a folder from before the record: its summary says 3 tokens, 2 rows
    (out / "decoding.json").write_text(json.dumps(record))
    with pytest.raises(ev.EvalError, match=r"max_new_tokens 3, now 5"):
        run(max_new_tokens=5)
    assert run()["benchmarks"]["bench"]["per_seed"] == first["per_seed"]
    assert json.loads((out / "decoding.json").read_text())["benchmarks"]["bench"]["max_new_tokens"] == 3
    shutil.rmtree(out / "bench")  # the way on the error names: the benchmark decoded again, nothing kept
    again = run(max_new_tokens=5)["benchmarks"]["bench"]
    assert again["max_new_tokens"] == 5 and list(again["per_seed"]) == ["greedy"]
    assert json.loads((out / "decoding.json").read_text())["benchmarks"]["bench"]["max_new_tokens"] == 5


def test_a_missing_target_or_recipe_is_the_only_argument_named_as_required(capsys):
    """argparse named the optional key=value overrides as required too."""
    for argv, name in ((["eval", "--greedy"], "target"), (["train"], "config"), (["run"], "config")):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert capsys.readouterr().err.rstrip().endswith(f"the following arguments are required: {name}")
