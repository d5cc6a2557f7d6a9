"""benchmarks/quality.py drives `srd run` experiments and records them: checked on tiny models."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest

from tests.conftest import ROWS

ROOT = Path(__file__).resolve().parents[1]


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality_bench", ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_quality_benchmark_runs_two_seeds_and_records(tmp_path, tiny_models, capsys):
    rows = [dict(r, id=f"r{i:02d}") for i, r in enumerate(ROWS + ROWS[::-1])]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    quality = _quality_module()
    record = tmp_path / "record.md"
    args = [
        "--preset",
        "cpu",
        "--seeds",
        "1",
        "2",
        "--out",
        str(tmp_path / "runs"),
        "--record",
        str(record),
        "--no-progress",
        "--variants",
        "none",  # the base runs only (the cpu preset's teacher-cache variant: see the dry-run test)
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={train}",
        f"data.dev={dev}",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "train.grad_accum=1",
        "generation.max_new_tokens=4",
        "generation.batch_size=2",
        f"eval.benchmarks=[{dev}]",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
    ]
    assert quality.main(args) == 0
    text = record.read_text()
    # teacher and initial student evaluated once (first run), KD and KD+SRD for each seed
    for label in ["| teacher |", "| student before KD |", "KD (fkl, seed 1)", "KD+SRD (fkl, seed 2)", "p = "]:
        assert label in text
    assert not (tmp_path / "runs" / "cpu-fkl-s2" / "references").exists()
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert runs == [".srd-folder.json", "cpu-fkl-s1", "cpu-fkl-s2", "machines.jsonl"]  # the benchmark's own folder
    assert "SRD total / KD" in text and "Run `" not in text  # every run finished
    assert "cpu-fkl-s2/baseline/stages/baseline/final` | `" in text and "cpu-fkl-s2/stages/stage-3/final` |" in text
    # the runs used the preset's settings where not overridden
    cfg = (tmp_path / "runs" / "cpu-fkl-s1" / "config.yaml").read_text()
    assert "epochs_per_stage: 1.0" in cfg and "divergence: fkl" in cfg
    # the record can be rewritten from the finished runs without training
    record.unlink()
    # rows are labelled by the command's settings: another batch size is not the runs' own
    other = [a if a != "train.batch_size=2" else "train.batch_size=3" for a in args]
    assert quality.main([*other, "--report-only"]) == 2 and not record.exists()
    assert "train.batch_size: 2 -> 3" in capsys.readouterr().err
    assert quality.main([*args, "train.eval_every=7", "--report-only"]) == 2  # another dev schedule
    assert "train.eval_every" in capsys.readouterr().err
    assert quality.main([*args, "--report-only", "--note", "A note.", "--note", "Another."]) == 0
    text = record.read_text()
    assert "KD+SRD (fkl, seed 1)" in text and "## Notes\n\nA note.\n\nAnother.\n" in text
    # the rewriting process's machine is labelled as such; the runs' own machine (allocator
    # included) comes from the log their start wrote, not from the process that rewrote them
    assert "\nMachine that wrote this record: " in text and "\nMachine: " not in text
    ran_on = text.split("Machines that ran these runs", 1)[1].split("\n\n", 2)[1].splitlines()
    assert len(ran_on) == 1 and ran_on[0].startswith("- ") and "(1 start): python " in ran_on[0]
    assert "cpu_malloc tuned" in ran_on[0] or "cpu_malloc default" in ran_on[0]
    # each row over the two training seeds: both seeds' differences, their spread and one pooled test
    seed_row = next(x for x in text.splitlines() if x.startswith("| KD+SRD (fkl, dense teacher) | dev | 1, 2 |"))
    assert " of 2 | " in seed_row and "(sd " in seed_row and "], p = " in seed_row
    step_rows = [line for line in text.splitlines() if line.startswith("| fkl, seed") and " x " in line]
    assert len(step_rows) == 2  # SRD and KD steps x their median step time, per run
    assert all(row.split(" | ")[1].count(" x ") == 3 for row in step_rows)  # one term per SRD stage


def test_quality_dry_run_prints_commands(capsys):
    quality = _quality_module()
    assert quality.main(["--preset", "gpu", "--random-init", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "model.teacher=random:gpt2-xl" in out and "curriculum.epochs_per_stage=8" in out
    assert "eval.checkpoint=best" in out and "dev_eval.num_examples=100" in out


def test_quality_cpu_preset_adds_a_teacher_cache_run(capsys):
    """The cpu preset's variant trains the same SRD run from the teacher's top-64 cache and is
    evaluated against the base run's KD baseline; --variants picks which variants run."""
    quality = _quality_module()
    assert quality.main(["--preset", "cpu", "--dry-run"]) == 0
    base, cached = capsys.readouterr().out.strip().splitlines()
    assert "'name=cpu-fkl-s42'" in base and "teacher_top_k" not in base
    assert "'name=cpu-fkl-s42-top64'" in cached and "'loss.teacher_top_k=64'" in cached
    assert "'compare.baseline=false'" in cached and """'eval.models=["final"]'""" in cached
    assert quality.main(["--preset", "cpu", "--dry-run", "--variants", "none"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 1
    assert quality.main(["--preset", "cpu", "--dry-run", "--variants", "top64"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2


def test_quality_references_choose_the_models_evaluated_once(capsys):
    quality = _quality_module()
    assert quality.main(["--preset", "gsm8k", "--dry-run", "--references", "teacher"]) == 0
    first, variant = capsys.readouterr().out.strip().splitlines()
    assert """'eval.models=["teacher", "baseline", "final"]'""" in first
    assert """'eval.models=["final"]'""" in variant  # the variant compares against the base run's KD
    assert quality.main(["--preset", "gsm8k", "--dry-run"]) == 0
    assert """'eval.models=["teacher", "initial", "baseline", "final"]'""" in capsys.readouterr().out
    # a bare --references followed by an override: no reference models, and the override kept
    assert quality.main(["--preset", "gsm8k", "--dry-run", "--variants", "none", "--references", "train.lr=0.5"]) == 0
    first = capsys.readouterr().out
    assert """'eval.models=["baseline", "final"]'""" in first and "train.lr=0.5" in first
    with pytest.raises(SystemExit):
        quality.main(["--preset", "gsm8k", "--dry-run", "--references", "teachr"])
    assert "--references teachr: choose from teacher, initial" in capsys.readouterr().err


def test_quality_variants_share_reflection_and_the_baseline(tmp_path, tiny_models):
    """The gsm8k preset's variant (answer_match added to the fusion) reuses the base run's
    reflection answers and KD baseline: one KD row, two KD+SRD rows named by their scorers."""
    rows = [
        {
            "id": f"m{i}",
            "instruction": f"What is {i} + {i + 1}?",
            "output": f"{i} + {i + 1} = {2 * i + 1}\n#### {2 * i + 1}",
        }
        for i in range(12)
    ]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    quality = _quality_module()
    record = tmp_path / "record.md"
    args = [
        "--preset",
        "gsm8k",
        "--out",
        str(tmp_path / "runs"),
        "--record",
        str(record),
        "--no-progress",
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={train}",
        f"data.dev={train}",
        "data.dev_limit=4",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "train.grad_accum=1",
        "generation.max_new_tokens=4",
        "generation.batch_size=2",
        f"eval.benchmarks=[{train}]",
        "eval.limit=4",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
    ]
    assert quality.main(args) == 0
    runs = tmp_path / "runs"
    base, variant = runs / "gsm8k-fkl-s42", runs / "gsm8k-fkl-s42-answer"
    assert (base / "baseline").exists() and not (variant / "baseline").exists()
    same = base / "reflection" / "outputs.rank0.jsonl", variant / "reflection" / "outputs.rank0.jsonl"
    assert same[0].read_text() == same[1].read_text()
    summary = json.loads((variant / "reflection" / "summary.json").read_text())
    assert summary["scorers"] == ["rouge_l", "ce", "answer_match"] and summary["wall_time_s"] < 5
    text = record.read_text()
    assert text.count("| KD (fkl, seed 42) |") == 1
    assert (
        "| KD+SRD (fkl, seed 42, rouge_l+ce) |" in text and "| KD+SRD (fkl, seed 42, rouge_l+ce+answer_match) |" in text
    )
    assert "Run `" not in text


def test_paper_cpu_plan_steps_and_equal_evaluation_schedules():
    """The paper-regime preset: 20 KD epochs against 8 per SRD stage (60% of the sample passes),
    and every run, KD included, evaluated on dev every 100 optimizer steps and at each stage's end."""
    quality = _quality_module()
    runs = quality.run_names("paper-cpu", ["fkl"], [42], list(quality.PRESETS["paper-cpu"]["variants"]))
    preset = quality.PRESETS["paper-cpu"]
    commands = {
        v: quality.overrides_for(preset, div, seed, name, Path("runs/x"), i == 0, [], v, ())
        for i, (name, div, seed, v) in enumerate(runs)
    }
    base = quality.plan(commands[""])
    assert [s["examples"] for s in base["stages"]] == [50, 100, 150]  # lambda 0.75 of 200, three slices
    assert [s["steps"] for s in base["stages"]] == [56, 104, 152]  # 8 epochs of ceil(n / 8) steps
    assert base["sample_passes"] == 8 * (50 + 100 + 150) == 0.6 * base["baseline"]["examples"] * 20
    assert base["baseline"] == {
        "examples": 200,
        "epochs": 20.0,
        "steps": 500,
        "evals": [0, 100, 200, 300, 400, 500],
    }
    assert [s["evals"] for s in base["stages"]] == [[0, 56], [100, 104], [100, 152]]
    for v, o in commands.items():
        assert "train.eval_every=100" in o and "dev_eval.num_examples=200" in o and "eval.checkpoint=best" in o
        assert ("compare.baseline=true" in o) == (v == "")  # one KD baseline, shared by every row
    assert [s["examples"] for s in quality.plan(commands["lambda1"])["stages"]] == [67, 134, 200]
    assert [s["examples"] for s in quality.plan(commands["tcl"])["stages"]] == [67, 134, 200]  # no filtering
    assert [s["examples"] for s in quality.plan(commands["lambda09"])["stages"]] == [60, 120, 180]
    # the stratified cut keeps floor(0.75 x 50) of each reference-length quarter: 148 rows
    assert [s["examples"] for s in quality.plan(commands["strat"])["stages"]] == [50, 99, 148]
    # the temperature controls: KD's 20 epochs on all 200 rows in three stages (167 steps each)
    for control in ("kdrise", "kdtau2"):
        pl = quality.plan(commands[control])
        assert [(s["examples"], s["steps"]) for s in pl["stages"]] == [(200, 167)] * 3 and "baseline" not in pl
        assert "method=scheduled_kd" in commands[control]
    assert "curriculum.tau_start=2.0" in commands["kdtau2"] and "curriculum.tau_start=2.0" not in commands["kdrise"]
    # the teacher and the initial student are evaluated last, not by the first run
    assert """eval.models=["baseline", "final"]""" in commands[""]


def _paper_cpu_tiny(tiny_models, train: Path, dev: Path, n_rows: int, *, epochs_per_stage: int) -> list[str]:
    """The paper-cpu preset's overrides for tiny models on tiny data (float32, 4-token answers)."""
    return [
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={train}",
        f"data.dev={dev}",
        f"data.train_limit={n_rows}",
        "data.dev_limit=4",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "loss.teacher_top_k=8",
        f"curriculum.epochs_per_stage={epochs_per_stage}",
        "train.batch_size=2",
        "train.grad_accum=1",
        "train.eval_every=3",
        "train.precision=fp32",
        "generation.max_new_tokens=4",
        "generation.batch_size=2",
        "dev_eval.num_examples=4",
        "dev_eval.max_new_tokens=4",
        f"eval.benchmarks=[{dev}]",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
        "eval.dtype=float32",
    ]


def test_paper_cpu_runs_ablation_rows_resumes_and_records(tmp_path, tiny_models):
    """The preset end to end on tiny models: a paused run resumes, every trained model is
    evaluated greedy and sampled, the references come last, a rerun retrains nothing."""
    rows = [dict(r, id=f"r{i:02d}") for i, r in enumerate(ROWS + ROWS[::-1])]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    quality = _quality_module()
    record, out = tmp_path / "record.md", tmp_path / "runs"
    args = [
        "--preset",
        "paper-cpu",
        "--out",
        str(out),
        "--record",
        str(record),
        "--no-progress",
        "--variants",
        "lambda1,tcl,kdrise",
        *_paper_cpu_tiny(tiny_models, train, dev, len(rows), epochs_per_stage=2),
        "train.save_every=2",
    ]
    assert quality.main([*args, "train.stop_after_steps=2"]) == 1  # paused in stage 1
    assert not (out / "paper-cpu-fkl-s42" / "experiment.json").exists()
    # a record of the unfinished preset says so and shows the dev curve done so far
    assert quality.main([*args, "--report-only"]) == 0
    partial = record.read_text()
    assert "Run `paper-cpu-fkl-s42` is not finished" in partial
    assert "| fkl, seed 42, unfinished | stage-1: 0 " in partial
    assert quality.main(args) == 0
    base = out / "paper-cpu-fkl-s42"
    names = ["paper-cpu-fkl-s42", "paper-cpu-fkl-s42-lambda1", "paper-cpu-fkl-s42-tcl"]
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == sorted([*names, "paper-cpu-fkl-s42-kdrise"])
    assert len((out / "machines.jsonl").read_text().splitlines()) == 2  # a start that paused, one that resumed
    # the temperature control reflected nothing and trained every stage on all the rows
    control = out / "paper-cpu-fkl-s42-kdrise"
    assert not (control / "reflection").exists()
    assert [s["examples"] for s in json.loads((control / "results.json").read_text())["stages"]] == [len(rows)] * 3
    trained = [base / "baseline"] + [out / n for n in names]
    for folder in trained:
        for mode in ("greedy", "sampled"):
            assert (folder / "eval" / mode / "summary.json").exists(), (folder, mode)
    seeds = sorted(p.name for p in (base / "eval" / "sampled" / "dev").glob("*.jsonl"))
    assert seeds == ["seed-10.jsonl", "seed-20.jsonl"]  # the preset's two sampling seeds
    # the references were evaluated after every trained model, both ways
    refs = [
        base / "references" / m / "eval" / mode / "summary.json"
        for m in ("teacher", "initial")
        for mode in ("greedy", "sampled")
    ]
    last_trained = max((f / "eval" / "sampled" / "summary.json").stat().st_mtime for f in trained)
    assert all(r.exists() and r.stat().st_mtime >= last_trained for r in refs)
    # the variants reused the base run's KD baseline; tcl reflected on its own, lambda1 copied the answers
    assert not (out / names[1] / "baseline").exists() and not (out / names[2] / "baseline").exists()
    assert (out / names[1] / "reflection" / "outputs.rank0.jsonl").read_text() == (
        base / "reflection" / "outputs.rank0.jsonl"
    ).read_text()
    assert json.loads((out / names[2] / "reflection" / "summary.json").read_text())["scorers"] == ["length", "entropy"]
    text = record.read_text()
    for want in [
        "## Scores (greedy",
        "## Scores (sampled at T = 1, seeds [10, 20]",
        "KD+SRD minus KD, greedy",
        "KD+SRD minus KD, sampled",
        "no selection (lambda = 1)",
        "traditional curriculum",
        "| teacher |",
        "| student before KD |",
        "Dev ROUGE-L at every evaluation",
        "KD's checkpoint",
        "control: KD with SRD's tau 1 -> 2",
        "## Over training seeds, sampled",
        "## What the selection kept: mean reference tokens (rows)",
        "## Answer lengths, greedy (fkl; words; training seeds 42 pooled)",
        "## dev, sampled, by reference length and topic",
        "| reference 0-10 words |",
    ]:
        assert want in text, want
    assert "Run `" not in text and "significant" in text and "], p = " in text
    assert "## The paper's KD+SRD minus each other row, sampled" in text
    # the references each row trained on, weighted by epochs: lambda = 1 keeps every row, so its
    # `as trained` mean is over all rows, each weighted by the stages that trained it
    manifest = [
        json.loads(line) for line in (out / names[1] / "reflection" / "manifest.jsonl").read_text().splitlines()
    ]
    epochs = {s["stage"]: s["epochs"] for s in json.loads((out / names[1] / "results.json").read_text())["stages"]}
    weight = {r["id"]: sum(e for st, e in epochs.items() if int(st.split("-")[1]) >= r["stage"]) for r in manifest}
    want = sum(r["stats"]["ref_tokens"] * weight[r["id"]] for r in manifest) / sum(weight.values())
    kept_table = text.split("## What the selection kept", 1)[1].split("\n## ", 1)[0]
    line = next(x for x in kept_table.splitlines() if x.startswith("| no selection (lambda = 1)"))
    assert line.endswith(f"| {want:.1f} |")
    # a rerun of the same command reuses everything: no step is trained again
    logs = sorted(out.glob("**/logs/train.jsonl"))
    before = {p: p.read_text() for p in logs}
    assert quality.main(args) == 0
    assert {p: p.read_text() for p in sorted(out.glob("**/logs/train.jsonl"))} == before
    # dev_choice.py decodes each row's best checkpoint on the dev rows again: the same scores the
    # runs logged, kept per model, and a paired test of each row against the first
    spec = importlib.util.spec_from_file_location("dev_choice_bench", ROOT / "benchmarks" / "dev_choice.py")
    dev_choice = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dev_choice)
    choice = tmp_path / "dev-choice.md"
    rows = ["--rows", "paper", "kd", "lambda1", "kdrise", "tau2"]
    argv = ["--out", str(out), "--preset", "paper-cpu", *rows, "--seeds", "42", "--record", str(choice)]
    assert dev_choice.main(argv) == 0  # read from the dev answers each run kept
    assert not (out / "dev-rows").exists()
    read = [line for line in choice.read_text().splitlines() if line.startswith("| ")]
    # runs without kept answers (srd before 2026-12-06) are decoded again, to the same scores
    for kept_answers in list(out.glob("**/logs/dev-answers")):
        shutil.rmtree(kept_answers)
    assert dev_choice.main(argv) == 0
    text = choice.read_text()
    assert [line for line in text.splitlines() if line.startswith("| ")] == read
    assert "Fidelity: 4 of 4 decoded means equal the logged best dev score" in text
    assert "| tau2 | - | - | - | - |" in text  # never run: left out, not an error
    assert re.search(r"\| kd \| 42 \| [+-]\d+\.\d\d \[", text) and "`paper` stays" in text
    kept = sorted(p.name for p in (out / "dev-rows").iterdir())
    assert kept == sorted(f"{n}-greedy.json" for n in [names[0], f"{names[0]}-kd", names[1], control.name])
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "dev-rows").iterdir()}
    assert dev_choice.main(argv) == 0 and {p: p.stat().st_mtime_ns for p in (out / "dev-rows").iterdir()} == mtimes
    with pytest.raises(SystemExit, match="--rows nope: not a row of preset paper-cpu"):
        dev_choice.main(["--out", str(out), "--preset", "paper-cpu", "--rows", "paper", "nope", "--seeds", "42"])
    # a row is labelled by its name: a run that is not that row as the preset defines it is refused
    saved = control / "config.yaml"
    before = saved.read_text()
    saved.write_text(before.replace("tau_end: 2.0", "tau_end: 3.0"))
    with pytest.raises(SystemExit, match=r"is not row kdrise as preset paper-cpu defines it now.*tau_end: 3.0 -> 2.0"):
        dev_choice.main(argv)
    saved.write_text(before)
    # --fresh N: the N dev rows after the runs' own (no checkpoint was chosen on them), decoded for
    # every model (kept dev answers are of the runs' own rows), kept apart from the own-row scores
    extra = [dict(r, output=r["output"] + " " + r["output"]) for r in ROWS[:3]]
    dev.write_text(dev.read_text() + "".join(json.dumps(r) + "\n" for r in extra))
    fresh = tmp_path / "fresh.md"
    argv = ["--out", str(out), "--preset", "paper-cpu", *rows, "--seeds", "42", "--fresh", "3", "--record", str(fresh)]
    assert dev_choice.main(argv) == 0
    text = fresh.read_text()
    assert "the 3 rows of " in text and "(rows 4-6: no checkpoint was chosen on them)" in text
    assert "Fidelity" not in text and "By the reference's length" in text and "| kd |" in text
    assert sorted(p.name for p in (out / "dev-rows").iterdir()) == sorted(
        [*kept, *(k.replace("-greedy", "-greedy-fresh3") for k in kept)]
    )
    own = json.loads((out / "dev-rows" / f"{names[0]}-greedy.json").read_text())
    new = json.loads((out / "dev-rows" / f"{names[0]}-greedy-fresh3.json").read_text())
    assert len(own["scores"]) == 4 and len(new["scores"]) == 3 and len(new["words"]) == 3
    assert new["key"]["rows"][-1] == 3 and "rows" not in own["key"]
    # by reference length: the first fresh row's reference has 12 words, the other two 8 each
    kd = json.loads((out / "dev-rows" / f"{names[0]}-kd-greedy-fresh3.json").read_text())["scores"]
    table = text.split("By the reference's length", 1)[1]
    assert "| reference 0-10 words (n = 2) | reference 11-30 words (n = 1) |" in table
    cells = next(x for x in table.splitlines() if x.startswith("| kd |")).split(" | ")
    assert cells[2].startswith(f"{kd[0] - new['scores'][0]:+.2f} (p = ")
    with pytest.raises(SystemExit, match=r"--fresh 4: the dev set .* has 7 rows, 4 of them the runs' own dev rows"):
        dev_choice.main([*argv[:-4], "--fresh", "4"])


def test_trl_quality_compares_trl_alone_with_trl_plus_srd(tmp_path, tiny_models):
    """benchmarks/trl_quality.py on tiny models: both arms train with TRL's trainer, are
    evaluated, and the record gives the difference with its interval; a rerun reuses them."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("trl_quality", ROOT / "benchmarks" / "trl_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    rows = [dict(r, id=f"r{i:02d}") for i, r in enumerate(ROWS + ROWS[::-1])]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    record, out = tmp_path / "record.md", tmp_path / "runs"
    args = [
        "--teacher", str(tiny_models["llama-teacher"]), "--student", str(tiny_models["llama-student"]),
        "--data", str(train), "--rows", "12", "--epochs-per-stage", "1", "--batch-size", "2", "--grad-accum", "1",
        "--max-len", "96", "--benchmarks", str(train), "--limit", "4", "--max-new-tokens", "4",
        "--reflect-overrides", "generation.max_new_tokens=4",
        "--out", str(out), "--record", str(record), "--no-progress",
    ]  # fmt: skip
    assert module.main(args) == 0
    text = record.read_text()
    assert "| trl |" in text and "| trl+srd |" in text and "], p = " in text and "not finished" not in text
    # srd's own loop at the same settings: its KD and KD+SRD rows, their difference, and the same
    # selection as reflect_dataset's
    assert "| srd KD |" in text and "| srd KD+SRD |" in text and "| srd KD+SRD minus srd KD |" in text
    assert re.search(r"srd's loop put \d+ of 12 rows in the stage that reflect_dataset put them in", text)
    loop = json.loads((out / "srd-loop" / "results.json").read_text())
    base = json.loads((out / "srd-loop" / "baseline" / "results.json").read_text())
    assert [s["examples"] for s in loop["stages"]] == [3, 6, 9] and [s["tau"] for s in loop["stages"]] == [1, 1.5, 2]
    assert loop["sample_passes"] == 18 and base["sample_passes"] == 30  # 60% of the baseline's passes
    # trl alone: 2.5 epochs of 12 rows in steps of 2; trl+srd: 3 + 6 + 9 rows, one epoch each, in
    # whole steps of 2 (1 + 3 + 4)
    trl_state = json.loads(sorted((out / "trl" / "trainer").glob("checkpoint-*/trainer_state.json"))[-1].read_text())
    srd_state = json.loads(
        sorted((out / "trl+srd" / "trainer").glob("checkpoint-*/trainer_state.json"))[-1].read_text()
    )
    assert trl_state["global_step"] == 15 and srd_state["global_step"] == 8
    assert {r["srd_stage"] for r in srd_state["log_history"] if "srd_stage" in r} <= {1, 2, 3}
    before = (out / "trl+srd" / "train_s.json").read_text()
    assert module.main(args) == 0 and (out / "trl+srd" / "train_s.json").read_text() == before  # reused
    # the arms were reused whatever the arguments: now other training arguments are refused, also
    # for a record written from the finished arms
    for extra in ([], ["--report-only"]):
        with pytest.raises(SystemExit, match=r"holds arms trained with other arguments \(--lr 0.0001, now 0.5\)"):
            module.main([*args, "--lr", "0.5", *extra])
    assert (out / "trl+srd" / "train_s.json").read_text() == before


def _fake_run(folder: Path, mode: str, scores: dict[str, float]) -> Path:
    """A run folder with one benchmark's per-example scores in eval/<mode> (what the record reads)."""
    (folder / "eval" / mode / "b").mkdir(parents=True)
    (folder / "eval" / mode / "b" / "greedy.jsonl").write_text(
        "".join(json.dumps({"id": i, "score": v}) + "\n" for i, v in scores.items())
    )
    mean = sum(scores.values()) / len(scores)
    (folder / "eval" / mode / "summary.json").write_text(
        json.dumps({"benchmarks": {"b": {"mean": mean, "per_seed": {"greedy": mean}}}})
    )
    return folder


def test_the_record_sets_srd_against_each_other_row_directly(tmp_path):
    """Per seed: SRD minus KD, the row minus KD, and SRD minus the row, with their signs; pooled
    over two training seeds. SRD is 3 above KD on every example, the control 1 above: SRD minus the
    control is +2 in each seed, and the seed counts say so."""
    quality = _quality_module()
    ids = [f"e{i}" for i in range(30)]
    finished = {}
    for seed in (1, 2):
        kd = {i: 10.0 + n % 7 + seed for n, i in enumerate(ids)}
        root = tmp_path / f"s{seed}"
        runs = {
            name: _fake_run(root / name, "greedy", {i: kd[i] + shift for i in ids})
            for name, shift in (("kd", 0.0), ("srd", 3.0), ("control", 1.0))
        }
        finished.setdefault(("fkl", ""), {})[seed] = (runs["kd"], runs["srd"])
        finished.setdefault(("fkl", "kdrise"), {})[seed] = (runs["kd"], runs["control"])
    preset = {"labels": {"kdrise": "the control"}}
    seeds = "\n".join(quality.seed_table(finished, "greedy", preset))
    versus = "\n".join(quality.versus_table(finished, "greedy", preset))
    assert "| KD+SRD (fkl) | b | 1, 2 | +3.00 / +3.00 | +3.00 (sd 0.00) | 2 of 2 | **+3.00** [+3.00, +3.00]" in seeds
    assert "| the control (fkl) | b | 1, 2 | +1.00 / +1.00 | +1.00 (sd 0.00) | 2 of 2 |" in seeds
    assert (
        "| the control (fkl) | b | 1, 2 | +2.00 / +2.00 | +2.00 (sd 0.00) | 2 of 2 | **+2.00** [+2.00, +2.00]" in versus
    )
    assert "KD+SRD (fkl) |" not in versus  # the base row is not set against itself
    # a row on a seed the base row lacks is left out of the direct comparison
    del finished[("fkl", "")][2]
    assert "| the control (fkl) | b | 1 | +2.00 |" in "\n".join(quality.versus_table(finished, "greedy", preset))


def test_seed_cells_leave_out_a_seed_still_being_evaluated(tmp_path):
    """A record rewritten while one seed's evaluation in a mode is still running (its run has
    finished training; some decoding seeds' files written, the summary not yet) gives the seeds
    whose evaluation finished, and a cell of dashes when none has: never a partial evaluation."""
    quality = _quality_module()

    def scores(folder: Path, values: list[float]) -> Path:
        (folder / "eval" / "sampled" / "b").mkdir(parents=True)
        rows = [{"id": f"x{i}", "score": v} for i, v in enumerate(values)]
        (folder / "eval" / "sampled" / "b" / "seed-10.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "eval" / "sampled" / "summary.json").write_text(
            json.dumps({"benchmarks": {"b": {"per_seed": {"seed-10": 0.0}}}})
        )
        return folder

    a42, b42 = scores(tmp_path / "a42", [1.0, 2.0, 3.0, 4.0]), scores(tmp_path / "b42", [2.0, 2.0, 5.0, 4.0])
    # seed 7's B: still running, one decoding seed's file written and no summary yet
    a7, b7 = scores(tmp_path / "a7", [1.0, 1.0, 1.0, 1.0]), scores(tmp_path / "b7", [9.0, 9.0, 9.0, 9.0])
    (b7 / "eval" / "sampled" / "summary.json").unlink()
    cells = quality._seed_cells([(7, a7, b7), (42, a42, b42)], "sampled", "b").split(" | ")
    assert cells[:4] == ["42", "+0.75", "+0.75", "1 of 1"] and cells[4].startswith("+0.75 [")
    assert quality._seed_cells([(7, a7, b7)], "sampled", "b") == "- | - | - | - | - |"


def test_bf16_notice_names_the_float32_switch_only_where_bf16_is_pinned_on_a_cpu_without_it():
    from srd.config import load_config

    quality = _quality_module()
    preset = quality.PRESETS["paper-cpu"]

    def cfg(preset, extra):
        return load_config(None, quality.overrides_for(preset, "fkl", 42, "x", Path("runs/q"), True, extra))

    notice = quality.bf16_notice(cfg(preset, []), native=False)
    assert "train.precision=bf16 and eval.dtype=bfloat16" in notice
    assert "train.precision=fp32 eval.dtype=float32" in notice
    assert quality.bf16_notice(cfg(preset, []), native=True) is None
    # the last value of a key wins, as in the run's own overrides
    assert quality.bf16_notice(cfg(preset, ["train.precision=fp32", "eval.dtype=float32"]), native=False) is None
    half = quality.bf16_notice(cfg(preset, ["train.precision=fp32"]), native=False)
    assert "pins eval.dtype=bfloat16," in half
    # the cpu preset leaves precision to auto: nothing to say
    assert quality.bf16_notice(cfg(quality.PRESETS["cpu"], []), native=False) is None


def _baseline_module():
    spec = importlib.util.spec_from_file_location("quality_baseline_bench", ROOT / "benchmarks" / "quality_baseline.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_pair_split_over_two_sittings_records_the_same_kd_as_one(tmp_path, tiny_models, capsys):
    """quality_baseline.py trains and evaluates only the KD half (the config srd run would give
    it after SRD), packs it without weights, and a fresh folder takes it in: quality.py then trains
    only SRD there (compare.baseline=false) and records the pair, its time ratio marked as split.
    What would break the plan is refused: a second unpack, SRD with the baseline switched on, a
    record whose KD half had other overrides."""
    import tarfile

    quality, half = _quality_module(), _baseline_module()
    rows = [dict(r, id=f"r{i:02d}") for i, r in enumerate(ROWS + ROWS[::-1])]
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:4]))
    overrides = _paper_cpu_tiny(tiny_models, train, dev, len(rows), epochs_per_stage=1)
    first, second, archive = tmp_path / "first", tmp_path / "second", tmp_path / "kd-half.tar.gz"
    side_args = ["--preset", "paper-cpu", "--no-progress", *overrides]
    assert half.main([*side_args, "--out", str(first)]) == 0
    kd = first / "paper-cpu-fkl-s42" / "baseline"
    assert not (first / "paper-cpu-fkl-s42" / "stages").exists()  # no SRD trained
    for mode in ("greedy", "sampled"):
        assert (kd / "eval" / mode / "summary.json").exists()
    side = json.loads((first / "paper-cpu-fkl-s42" / "baseline-side.json").read_text())
    plan = quality.plan(quality.overrides_for(quality.PRESETS["paper-cpu"], "fkl", 42, "x", first, True, overrides))
    assert (
        side["baseline_epochs"] == plan["baseline"]["epochs"]
        and side["sample_passes"] == len(rows) * side["baseline_epochs"]
    )
    assert half.main([*side_args, "--out", str(first), "--pack", str(archive)]) == 0
    with tarfile.open(archive) as tar:
        names = tar.getnames()
    assert "baseline-side.json" in names and not [n for n in names if n.endswith(".safetensors")]
    with pytest.raises(SystemExit, match="exists; choose a new file name"):  # never over a file
        half.main([*side_args, "--out", str(first), "--pack", str(archive)])

    assert half.main([*side_args, "--out", str(second), "--unpack", str(archive)]) == 0
    with pytest.raises(SystemExit, match="holds a KD baseline already"):
        half.main([*side_args, "--out", str(second), "--unpack", str(archive)])
    q_args = ["--preset", "paper-cpu", "--variants", "none", "--references", "--no-progress", "--out", str(second)]
    assert quality.main([*q_args, *overrides]) == 2  # SRD would train the baseline over the restored one
    assert "add compare.baseline=false" in capsys.readouterr().err
    split = [*overrides, "compare.baseline=false"]
    assert quality.main([*q_args, *split, "--record", str(tmp_path / "r1.md")]) == 0
    run = second / "paper-cpu-fkl-s42"
    assert (run / "stages").exists() and not list((run / "baseline").rglob("*.safetensors"))  # KD not retrained
    record = tmp_path / "record.md"
    assert quality.main([*q_args, *split, "--report-only", "--record", str(record)]) == 0
    text = record.read_text()
    assert "KD+SRD minus KD, greedy" in text and "KD+SRD minus KD, sampled" in text
    assert "Run `" not in text and "% (split) |" in text and "KD's half was trained" in text
    for mode in ("greedy", "sampled"):
        mean = json.loads((kd / "eval" / mode / "summary.json").read_text())["benchmarks"]["dev"]["mean"]
        assert f"| KD (fkl, seed 42) | {mean:.2f} |" in text
    assert "quality_baseline.py" in text  # the machines of both sittings are listed
    # the KD half's overrides must be the record's
    side_path = run / "baseline-side.json"
    side = json.loads(side_path.read_text())
    side_path.write_text(json.dumps({**side, "overrides": [*side["overrides"], "loss.tau=2.0"]}))
    assert quality.main([*q_args, *split, "--report-only", "--record", str(tmp_path / "r2.md")]) == 2
    assert "KD half" in capsys.readouterr().err
