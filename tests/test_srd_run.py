"""SRD end to end on tiny models: manifest, cumulative stages, schedules, resume, 1 vs 2 processes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import srd.reflect.reflect as reflect_mod
import srd.train.loop as loop_mod
from srd.cli import main
from tests.conftest import ROWS, run_cli_in_processes


@pytest.fixture
def srd_data(tmp_path) -> dict[str, Path]:
    rows = [dict(r, id=f"r{i:02d}") for i, r in enumerate(ROWS + ROWS[::-1] + ROWS[:4])]  # 20 rows
    train, dev = tmp_path / "train.jsonl", tmp_path / "dev.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:3]))
    return {"train": train, "dev": dev}


def _args(cmd, tiny_models, data, out, *extra):
    return [
        cmd,
        "--no-progress",
        "-",
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={data['train']}",
        f"data.dev={data['dev']}",
        f"output_dir={out}",
        "name=x",
        "seed=0",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "train.batch_size=2",
        "train.lr=1e-3",
        "curriculum.epochs_per_stage=1",
        "generation.max_new_tokens=6",
        "generation.batch_size=1",
        "reflect.batch_size=1",
        "dev_eval.num_examples=0",
        *extra,
    ]


def _manifest(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "reflection" / "manifest.jsonl").read_text().splitlines()]


def test_srd_run_end_to_end(tmp_path, tiny_models, srd_data):
    assert main(_args("run", tiny_models, srd_data, tmp_path)) == 0
    run = tmp_path / "x"
    manifest = _manifest(run)
    assert len(manifest) == 20
    for row in manifest:
        assert set(row) >= {"id", "scores", "ranks", "fused", "kept", "stage", "student_output", "position"}
        assert set(row["scores"]) == {"rouge_l", "ce"}
        assert row["fused"] == pytest.approx(sum(1 / (60 + r) for r in row["ranks"].values()))
    kept = [r for r in manifest if r["kept"]]
    assert len(kept) == 15  # floor(0.75 * 20)
    # kept = the 15 best fused scores; stages are consecutive slices of 5 in easy -> hard order
    by_pos = sorted(manifest, key=lambda r: r["position"])
    assert [r["kept"] for r in by_pos] == [True] * 15 + [False] * 5
    assert [r["stage"] for r in by_pos[:15]] == [1] * 5 + [2] * 5 + [3] * 5
    assert all(a["fused"] >= b["fused"] for a, b in zip(by_pos, by_pos[1:]))
    # stage i trains on exactly the union of the i easiest slices, with the scheduled tau/alpha
    results = json.loads((run / "results.json").read_text())
    for i, (tau, alpha) in enumerate([(1.0, 0.3), (1.5, 0.2), (2.0, 0.1)], start=1):
        stage = json.loads((run / "stages" / f"stage-{i}" / "examples.json").read_text())
        assert set(stage["ids"]) == {r["id"] for r in manifest if r["stage"] is not None and r["stage"] <= i}
        logged = [
            json.loads(x) for x in (run / "stages" / f"stage-{i}" / "logs" / "train.jsonl").read_text().splitlines()
        ]
        assert {r["tau"] for r in logged} == {tau}
        assert all(r["alpha"] == pytest.approx(alpha) for r in logged)
        assert results["stages"][i - 1]["examples"] == 5 * i
    assert results["complete"] and results["reflection_s"] > 0 and results["total_s"] >= results["train_s"]
    # 1 epoch over 5, 10, 15 examples at batch 2: 3 + 5 + 8 steps
    assert [s["steps"] for s in results["stages"]] == [3, 5, 8]


def test_baseline_and_traditional_methods(tmp_path, tiny_models, srd_data):
    assert main(_args("run", tiny_models, srd_data, tmp_path / "b", "method=baseline", "train.epochs=1")) == 0
    res = json.loads((tmp_path / "b" / "x" / "results.json").read_text())
    assert res["method"] == "baseline" and res["stages"][0]["examples"] == 20 and res["reflection_s"] == 0
    assert main(_args("run", tiny_models, srd_data, tmp_path / "t", "method=traditional")) == 0
    manifest = _manifest(tmp_path / "t" / "x")
    assert all(r["kept"] for r in manifest) and set(manifest[0]["scores"]) == {"length", "entropy"}
    assert all(r["student_output"] == "" for r in manifest)  # no generation needed


def test_scheduled_kd_trains_every_stage_on_all_rows_with_srds_schedules(tmp_path, tiny_models, srd_data, capsys):
    # the temperature control: SRD's tau 1 -> 2 and alpha 0.3 -> 0.1, no reflection, no selection
    assert main(_args("run", tiny_models, srd_data, tmp_path, "method=scheduled_kd")) == 0
    run = tmp_path / "x"
    assert not (run / "reflection").exists()
    res = json.loads((run / "results.json").read_text())
    assert res["method"] == "scheduled_kd" and res["reflection_s"] == 0
    assert [s["tau"] for s in res["stages"]] == [1.0, 1.5, 2.0]
    assert [s["alpha"] for s in res["stages"]] == pytest.approx([0.3, 0.2, 0.1])
    ids = {f"r{i:02d}" for i in range(20)}
    for i in (1, 2, 3):
        assert set(json.loads((run / "stages" / f"stage-{i}" / "examples.json").read_text())["ids"]) == ids
    assert [s["steps"] for s in res["stages"]] == [10, 10, 10]  # 1 epoch over 20 rows at batch 2
    assert res["sample_passes"] == 60
    # tau fixed at 2 with the falling alpha (the other control)
    extra = ("method=scheduled_kd", "curriculum.tau_schedule=fixed", "curriculum.tau_start=2", "name=y")
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    res = json.loads((tmp_path / "y" / "results.json").read_text())
    assert [s["tau"] for s in res["stages"]] == [2.0, 2.0, 2.0]
    capsys.readouterr()
    assert main(_args("run", tiny_models, srd_data, tmp_path, "method=scheduled_kd", "curriculum.re_reflect=true")) == 2
    assert "curriculum.re_reflect" in capsys.readouterr().err


def test_ablation_switches_reach_the_stages(tmp_path, tiny_models, srd_data):
    extra = (
        "curriculum.order=hard_to_easy",
        "curriculum.tau_schedule=falling",
        "curriculum.alpha_schedule=fixed",
        "reflect.scorers=[ce]",
        "curriculum.num_stages=2",
        "reflect.keep_ratio=0.5",
    )
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    run = tmp_path / "x"
    manifest = _manifest(run)
    by_pos = sorted(manifest, key=lambda r: r["position"])
    # hard_to_easy: the harder half of the kept data comes first
    assert [r["stage"] for r in by_pos[:10]] == [2] * 5 + [1] * 5
    assert all(a["scores"]["ce"] <= b["scores"]["ce"] for a, b in zip(by_pos, by_pos[1:]))
    res = json.loads((run / "results.json").read_text())
    assert [s["tau"] for s in res["stages"]] == [2.0, 1.0]
    assert [s["alpha"] for s in res["stages"]] == pytest.approx([0.3, 0.3])


@pytest.mark.parametrize("sampling", [[], ["generation.do_sample=true"]], ids=["greedy", "sampled"])
def test_reflection_resumes_without_regenerating(tmp_path, tiny_models, srd_data, monkeypatch, sampling):
    """An interrupted reflection keeps its saved groups, generates the cut block again whole (so
    that every answer is batched as in one go: in bf16 a batch's rows change each other's
    logits), saves only the rows it lacked, and ends with the uninterrupted manifest (sampled
    answers too: each training row has its own seed)."""
    real, given = reflect_mod.iter_responses, []

    def flaky(*args, **kwargs):  # interrupted at the 11th answer: 2 groups of 4 were saved
        given.append(len(args[2]))
        for k, pair in enumerate(real(*args, **kwargs)):
            if k == 10:
                raise KeyboardInterrupt
            yield pair

    monkeypatch.setattr(reflect_mod, "CHUNK", 4)
    monkeypatch.setattr(reflect_mod, "iter_responses", flaky)
    assert main(_args("reflect", tiny_models, srd_data, tmp_path, *sampling)) == 130
    out = tmp_path / "x" / "reflection" / "outputs.rank0.jsonl"
    assert len(out.read_text().splitlines()) == 8
    with open(out, "a") as f:
        f.write('{"id": "r99", "student_out')  # a torn line from a crash mid-write
    monkeypatch.setattr(reflect_mod, "iter_responses", lambda *a, **k: given.append(len(a[2])) or real(*a, **k))
    assert main(_args("reflect", tiny_models, srd_data, tmp_path, *sampling)) == 0
    assert given == [20, 20]  # the rerun generated the block (here all 20 rows) again, whole
    saved = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert len(saved) == len(set(saved)) == 20  # the 8 kept, the torn line dropped, the 12 missing added
    assert len(_manifest(tmp_path / "x")) == 20
    # a fresh run in another folder gives the same manifest
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "fresh", *sampling)) == 0
    a, b = _manifest(tmp_path / "x"), _manifest(tmp_path / "fresh" / "x")
    assert [(r["id"], r["stage"], r["student_output"]) for r in a] == [
        (r["id"], r["stage"], r["student_output"]) for r in b
    ]
    assert not sampling or len({r["student_output"] for r in a}) > 1  # sampled: the rows differ


def test_reflection_with_the_static_cache_backend_gives_the_same_manifest(tmp_path, tiny_models, srd_data):
    """generation.backend=static (one KV-cache shape, compiled on a GPU) decodes what the loop does."""
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "loop", "generation.batch_size=4")) == 0
    static = _args("reflect", tiny_models, srd_data, tmp_path / "static", "generation.batch_size=4")
    assert main([*static, "generation.backend=static"]) == 0
    a, b = _manifest(tmp_path / "loop" / "x"), _manifest(tmp_path / "static" / "x")
    assert [(r["id"], r["stage"], r["student_output"]) for r in a] == [
        (r["id"], r["stage"], r["student_output"]) for r in b
    ]
    assert any(r["student_output"] for r in a)


def test_changed_data_is_detected(tmp_path, tiny_models, srd_data, capsys):
    assert main(_args("reflect", tiny_models, srd_data, tmp_path)) == 0
    rows = srd_data["train"].read_text().splitlines()
    srd_data["train"].write_text("\n".join(rows[:-1]).replace("Paris", "Lyon") + "\n")
    # same config, different data behind the same path
    assert main(_args("reflect", tiny_models, srd_data, tmp_path)) == 2
    assert "different data" in capsys.readouterr().err


def test_srd_run_resumes_inside_a_stage(tmp_path, tiny_models, srd_data):
    full = tmp_path / "full"
    assert main(_args("run", tiny_models, srd_data, full, "train.save_every=1")) == 0
    part = tmp_path / "part"
    assert main(_args("run", tiny_models, srd_data, part, "train.save_every=1", "train.stop_after_steps=4")) == 0
    assert not (part / "x" / "results.json").exists() or not json.loads((part / "x" / "results.json").read_text()).get(
        "complete"
    )
    assert (part / "x" / "stages" / "stage-2").exists()  # stage 1 (3 steps) done, paused in stage 2
    assert main(_args("run", tiny_models, srd_data, part, "train.save_every=1")) == 0
    from safetensors.torch import load_file

    wa = load_file(full / "x" / "stages" / "stage-3" / "final" / "model.safetensors")
    wb = load_file(part / "x" / "stages" / "stage-3" / "final" / "model.safetensors")
    assert all((wa[k] == wb[k]).all() for k in wa)


@pytest.mark.slow
def test_two_processes_give_the_same_manifest(tmp_path, tiny_models, srd_data):
    """Prompts are sharded over 2 CPU processes (gloo) and gathered: same manifest as 1 process."""
    args = _args("reflect", tiny_models, srd_data, tmp_path / "two")
    proc = run_cli_in_processes(args, port=29517)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = tmp_path / "two" / "x" / "reflection"
    assert len(list(two.glob("outputs.rank*.jsonl"))) == 2
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "one")) == 0
    a, b = _manifest(tmp_path / "one" / "x"), _manifest(tmp_path / "two" / "x")
    assert [(r["id"], r["kept"], r["stage"], r["position"], r["student_output"]) for r in a] == [
        (r["id"], r["kept"], r["stage"], r["position"], r["student_output"]) for r in b
    ]
    for ra, rb in zip(a, b):
        assert ra["scores"]["ce"] == pytest.approx(rb["scores"]["ce"], rel=1e-5)


def test_global_lr_schedule_and_re_reflection(tmp_path, tiny_models, srd_data):
    extra = ("curriculum.lr_schedule=global", "curriculum.re_reflect=true", "train.min_lr=0.0")
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    run = tmp_path / "x"
    lrs = [
        [json.loads(x)["lr"] for x in (run / "stages" / f"stage-{i}" / "logs" / "train.jsonl").read_text().splitlines()]
        for i in (1, 2, 3)
    ]
    flat = [lr for stage in lrs for lr in stage]
    # one cosine over all 16 steps: strictly decreasing across stage boundaries, from the peak
    assert flat[0] == pytest.approx(1e-3) and all(a > b for a, b in zip(flat, flat[1:]))
    # stages 2 and 3 were re-ranked by the student as it was then, in their own folders
    for i in (2, 3):
        manifest = [json.loads(x) for x in (run / f"reflection-stage-{i}" / "manifest.jsonl").read_text().splitlines()]
        ids = json.loads((run / "stages" / f"stage-{i}" / "examples.json").read_text())["ids"]
        assert set(ids) == {r["id"] for r in manifest if r["stage"] is not None and r["stage"] <= i}
    meta = [
        json.loads((run / d / "meta.json").read_text())["student"]
        for d in ("reflection", "reflection-stage-2", "reflection-stage-3")
    ]
    assert len(set(meta)) == 3  # three different students did the reflecting
    # the re-reflections are time the method costs: counted in the run's reflection time
    seconds = [
        json.loads((run / d / "summary.json").read_text())["wall_time_s"]
        for d in ("reflection", "reflection-stage-2", "reflection-stage-3")
    ]
    results = json.loads((run / "results.json").read_text())
    assert results["reflection_s"] == pytest.approx(sum(seconds), abs=1e-3)


def test_reflect_does_not_load_the_teacher(tmp_path, tiny_models, srd_data, capsys):
    args = _args("reflect", tiny_models, srd_data, tmp_path)
    args = [a if not a.startswith("model.teacher=") else f"model.teacher={tmp_path / 'no-such-teacher'}" for a in args]
    assert main(args) == 0  # reflection only needs the student
    # its time, split into generation and the CE pass, in the summary and the printed line
    summary = json.loads((tmp_path / "x" / "reflection" / "summary.json").read_text())
    assert 0 < summary["measure_s"] < summary["wall_time_s"]
    assert "CE and statistics pass" in capsys.readouterr().out
    # a summary from before the split: a rerun does not pretend to know the old part's split
    path = tmp_path / "x" / "reflection" / "summary.json"
    path.write_text(json.dumps({k: v for k, v in summary.items() if k != "measure_s"}))
    assert main(args) == 0
    assert "measure_s" not in json.loads(path.read_text())
    assert "CE and statistics pass" not in capsys.readouterr().out
    args[0] = "run"
    assert main(args) == 2  # the curriculum's KD stages do need it


def test_scorers_relative_to_the_teacher(tmp_path, tiny_models, srd_data, monkeypatch, capsys):
    """teacher_ce and ce_gap: one teacher forward over the references (no generation), saved and
    reused, keyed on the teacher; srd reflect loads the teacher only for them."""
    from srd.data.sources import load_examples
    from srd.data.tokenize import encode_example
    from srd.models.load import load_model, load_tokenizer

    args = _args("reflect", tiny_models, srd_data, tmp_path, "reflect.scorers=[rouge_l, ce, teacher_ce, ce_gap]")
    assert main(args) == 0
    folder = tmp_path / "x" / "reflection"
    manifest = _manifest(tmp_path / "x")
    assert (folder / "teacher_stats.jsonl").exists() and (folder / "teacher_meta.json").exists()
    # teacher_ce is the teacher's own mean CE on the reference, measured as the student's CE is
    tok = load_tokenizer(str(tiny_models["llama-teacher"]))
    teacher = load_model(str(tiny_models["llama-teacher"]))
    rows = {ex.id: ex for ex in load_examples(str(srd_data["train"]))}
    ids = [r["id"] for r in manifest[:3]]
    enc = [encode_example(tok, rows[i], fmt="alpaca", max_prompt_len=64, max_len=96) for i in ids]
    expected = reflect_mod.sequence_stats(teacher, tok, enc, batch_size=1)
    for row, want in zip(manifest[:3], expected):
        assert row["scores"]["teacher_ce"] == pytest.approx(want["ce"], rel=1e-4)
        assert row["scores"]["ce_gap"] == pytest.approx(row["scores"]["ce"] - row["scores"]["teacher_ce"])
        assert set(row["ranks"]) == {"rouge_l", "ce", "teacher_ce", "ce_gap"}
    # the rows the teacher finds hardest rank last on teacher_ce (the data repeats rows: ties)
    worst = max(r["scores"]["teacher_ce"] for r in manifest)
    assert max(r["ranks"]["teacher_ce"] for r in manifest if r["scores"]["teacher_ce"] == worst) == len(manifest)
    # a rerun reuses the teacher's statistics; another teacher invalidates them
    monkeypatch.setattr(reflect_mod, "sequence_stats", lambda *a, **k: pytest.fail("measured again"))
    (folder / "manifest.jsonl").unlink()
    assert main(args) == 0
    monkeypatch.undo()
    meta = json.loads((folder / "teacher_meta.json").read_text())
    (folder / "teacher_meta.json").write_text(json.dumps({**meta, "teacher": "another"}))
    assert main(args) == 0
    assert json.loads((folder / "teacher_meta.json").read_text()) == meta
    # without a teacher: one line, before any weights load
    capsys.readouterr()
    no_teacher = [a for a in args if not a.startswith("model.teacher=")] + ["model.teacher=null", "loss.alpha=1.0"]
    assert main(no_teacher) == 2
    assert "teacher_ce" in capsys.readouterr().err


def test_stratified_cut_keeps_each_reference_length_group(tmp_path, tiny_models, srd_data):
    args = _args("reflect", tiny_models, srd_data, tmp_path, "reflect.stratify=reference_length", "reflect.strata=2")
    assert main(args) == 0
    manifest = _manifest(tmp_path / "x")
    by_stratum = {s: [r for r in manifest if r["stratum"] == s] for s in (0, 1)}
    assert [len(rows) for rows in by_stratum.values()] == [10, 10]
    # the shorter references form stratum 0; each stratum keeps its easiest 75% (floor: 7 of 10)
    assert max(r["stats"]["ref_tokens"] for r in by_stratum[0]) <= min(r["stats"]["ref_tokens"] for r in by_stratum[1])
    for rows in by_stratum.values():
        kept = [r for r in rows if r["kept"]]
        assert len(kept) == 7 and min(r["fused"] for r in kept) >= max(r["fused"] for r in rows if not r["kept"])
    # reference_length_stages: the same kept rows, each stratum's staged on its own (7 rows: 3 / 2 / 2)
    staged = _args("reflect", tiny_models, srd_data, tmp_path / "s", "reflect.stratify=reference_length_stages")
    assert main([*staged, "reflect.strata=2"]) == 0
    again = {r["id"]: r for r in _manifest(tmp_path / "s" / "x")}
    assert {i for i, r in again.items() if r["kept"]} == {r["id"] for r in manifest if r["kept"]}
    for s in (0, 1):
        rows = sorted((r for r in again.values() if r["stratum"] == s and r["kept"]), key=lambda r: -r["fused"])
        assert [r["stage"] for r in rows] == [1, 1, 1, 2, 2, 3, 3]


def test_run_as_experiment_baseline_eval_report(tmp_path, tiny_models, srd_data, monkeypatch, capsys):
    """compare.baseline + eval: SRD, the KD baseline at 1/0.6 of SRD's sample passes, four evaluated
    models, comparison table with p-values, report with plots; a rerun recomputes nothing."""
    extra = [
        "compare.baseline=true",
        f"eval.benchmarks=[{srd_data['dev']}]",
        "eval.models=[teacher, initial, baseline, final]",
        "eval.greedy=true",
        "eval.limit=3",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
        "dev_eval.num_examples=3",  # dev ROUGE-L, and each dev answer kept
        "dev_eval.max_new_tokens=4",
    ]
    import srd.recipes.train as recipes_train

    reads, load_mixture = [], recipes_train.load_mixture
    monkeypatch.setattr(recipes_train, "load_mixture", lambda *a, **k: reads.append(1) or load_mixture(*a, **k))
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    assert len(reads) == 1  # the training rows read once: the benchmark check, SRD and KD share them
    run = tmp_path / "x"
    srd_res = json.loads((run / "results.json").read_text())
    base_res = json.loads((run / "baseline" / "results.json").read_text())
    assert base_res["method"] == "baseline" and base_res["examples"] == 20
    assert srd_res["sample_passes"] == 30  # 1 epoch over 5 + 10 + 15 examples
    assert base_res["sample_passes"] == pytest.approx(30 / 0.6)  # 2.5 epochs over all 20
    assert base_res["stages"][0]["alpha"] == 0.5 and base_res["stages"][0]["tau"] == 1.0  # loss.alpha / loss.tau
    eval_seconds = {}
    for name, folder in zip(
        ["teacher", "initial", "baseline", "final"],
        [run / "references" / "teacher", run / "references" / "initial", run / "baseline", run],
    ):
        summary = json.loads((folder / "eval" / "greedy" / "summary.json").read_text())
        dev = summary["benchmarks"]["dev"]
        assert dev["n"] == 3 and dev["max_new_tokens"] == 4 and dev["sampling"] is False  # as decoded
        eval_seconds[name] = sum(dev["wall_time_s"].values())
    models = json.loads((run / "experiment.json").read_text())["models"]
    from srd.eval.evaluate import resolve_eval_target

    assert resolve_eval_target(str(run)) == (str(run / "stages" / "stage-3" / "final"), run)  # eval.checkpoint=final
    assert models["teacher"] == str(tiny_models["llama-teacher"]) and models["initial"] == str(
        tiny_models["llama-student"]
    )
    timing = json.loads((run / "experiment.json").read_text())["timing"]
    assert timing["eval_s"] == pytest.approx(eval_seconds, abs=1e-3)
    assert timing["srd_time_fraction"] == pytest.approx(srd_res["total_s"] / base_res["total_s"], rel=1e-3)
    comparison = (run / "comparison.md").read_text()
    for label in ["| KD |", "| KD+SRD (x) |", "| teacher |", "| student before KD |", "p = "]:
        assert label in comparison
    report = (run / "report.md").read_text()
    assert "## Comparison" in report and "timing.png" in report and "comparison.png" in report
    assert (run / "report" / "comparison.png").stat().st_size > 0
    # the dev difference that chose the two checkpoints, paired over the dev rows each run kept
    from srd.report import best_dev_rows, difference_cell, paired_difference

    kd_rows, srd_rows = best_dev_rows(run / "baseline"), best_dev_rows(run)
    assert kd_rows and sorted(kd_rows) == sorted(srd_rows)
    assert sum(srd_rows.values()) / len(srd_rows) == pytest.approx(srd_res["best_checkpoint"]["dev_rougeL"])
    pair = next(line for line in report.splitlines() if line.startswith("Dev ROUGE-L at the two best checkpoints"))
    assert difference_cell(paired_difference(kd_rows, srd_rows)) in pair and "KD+SRD minus KD" in pair
    out = capsys.readouterr().out
    assert "report: " in out and "of the KD baseline's time" in out

    def no_generation(*args, **kwargs):
        raise AssertionError("a finished evaluation was recomputed")

    monkeypatch.setattr("srd.eval.evaluate.iter_responses", no_generation)
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    # a rerun reuses the evaluations and still reports the time they took
    timing = json.loads((run / "experiment.json").read_text())["timing"]
    assert timing["eval_s"] == pytest.approx(eval_seconds, abs=1e-3) and min(eval_seconds.values()) > 0


def test_eval_checkpoint_best_evaluates_the_best_dev_rouge_checkpoints(tmp_path, tiny_models, srd_data, capsys):
    """eval.checkpoint=best (the paper's protocol): SRD's and the baseline's evaluated models are
    the best/ folders with the highest dev ROUGE-L over their stages; switching back to final on
    the finished run is refused rather than reusing the other model's scores."""
    extra = [
        "compare.baseline=true",
        f"eval.benchmarks=[{srd_data['dev']}]",
        "eval.models=[baseline, final]",
        "eval.greedy=true",
        "eval.limit=2",
        "eval.max_new_tokens=3",
        "eval.checkpoint=best",
        "dev_eval.num_examples=2",
        "dev_eval.max_new_tokens=4",
    ]
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra)) == 0
    run = tmp_path / "x"
    srd_res = json.loads((run / "results.json").read_text())
    base_res = json.loads((run / "baseline" / "results.json").read_text())
    models = json.loads((run / "experiment.json").read_text())["models"]
    for res, key in ((srd_res, "final"), (base_res, "baseline")):
        best = res["best_checkpoint"]
        assert models[key] == res["best_model"] == best["model"] and best["model"].endswith("/best")
        scores = []
        for stage in res["stages"]:
            metrics = json.loads(
                (Path(best["model"]).parents[1] / stage["stage"] / "best" / "metrics.json").read_text()
            )
            scores.append((metrics["dev_rougeL"], stage["stage"]))
        assert best["dev_rougeL"] == max(v for v, _ in scores)
        assert best["stage"] == [name for v, name in scores if v == best["dev_rougeL"]][-1]  # a tie: the later stage
    assert "best dev ROUGE-L checkpoint" in (run / "comparison.md").read_text()
    out, err = capsys.readouterr()
    assert "warning: eval.checkpoint=best with train.eval_every=0" in err  # stage ends only
    assert (
        f"best dev ROUGE-L: {srd_res['best_checkpoint']['dev_rougeL']:.2f} ({srd_res['best_checkpoint']['stage']}"
        in out
    )
    report = (run / "report.md").read_text()
    best = srd_res["best_checkpoint"]
    assert f"Best dev ROUGE-L: {best['dev_rougeL']:.2f}, {best['stage']} at step {best['step']}" in report
    assert f"final `{best['model']}`" in report and f"baseline `{base_res['best_model']}`" in report
    # the time claim and the quality claim in one picture: dev ROUGE-L on each method's own clock
    from srd.report import dev_over_time

    assert "dev_over_time.png" in report and (run / "report" / "dev_over_time.png").stat().st_size > 0
    srd_curve, kd_curve = dev_over_time(run), dev_over_time(run / "baseline")
    assert len(srd_curve) == 4 and len(kd_curve) == 2  # stage-1 start and end, the end of stages 2 and 3
    # each point when its score was known: after its own evaluation, on the stage clocks that add up
    # to the method's time (the first evaluation and the last count)
    first_eval = json.loads((run / "stages" / "stage-1" / "logs" / "eval.jsonl").read_text().splitlines()[0])
    assert first_eval["elapsed_s"] > 0
    start = srd_res["reflection_s"] + srd_res["teacher_cache_s"]
    assert srd_curve[0][0] == pytest.approx(start + first_eval["elapsed_s"])
    last_stage = srd_res["stages"][-1]
    assert srd_res["total_s"] - last_stage["wall_time_s"] < srd_curve[-1][0] <= srd_res["total_s"]
    assert 0 < srd_res["dev_eval_s"] < srd_res["train_s"] and 0 < base_res["dev_eval_s"] < base_res["train_s"]
    assert [x for x, _ in srd_curve] == sorted(x for x, _ in srd_curve) and kd_curve[0][0] > 0.0
    from srd.eval.evaluate import resolve_eval_target

    # srd eval RUN evaluates what the run evaluated: here its best checkpoint
    assert resolve_eval_target(str(run)) == (str(run / "stages" / srd_res["best_checkpoint"]["stage"] / "best"), run)
    capsys.readouterr()
    assert main(_args("run", tiny_models, srd_data, tmp_path, *extra[:-3], "eval.checkpoint=final", *extra[-2:])) == 2
    err = capsys.readouterr().err
    assert "holds the evaluation of" in err and "/best" in err and "eval.checkpoint" in err


def test_eval_checkpoint_best_needs_dev_answers(tmp_path, tiny_models, srd_data, capsys):
    args = _args("run", tiny_models, srd_data, tmp_path, "eval.benchmarks=[dolly-eval]", "eval.checkpoint=best")
    assert main(args) == 2  # _args sets dev_eval.num_examples=0
    assert "dev_eval.num_examples > 0" in capsys.readouterr().err


def test_best_checkpoint_picks_the_highest_dev_rouge_over_stages(tmp_path):
    from srd.recipes.pipeline import best_checkpoint

    for name, metrics in {
        "stage-1": {"step": 0, "dev_rougeL": 20.0},
        "stage-2": {"step": 6, "dev_rougeL": 25.0},
        "stage-3": {"step": 9, "dev_rougeL": 25.0},
        "stage-4": {"step": 12, "dev_loss": 1.0},
    }.items():
        (tmp_path / "stages" / name / "best").mkdir(parents=True)
        (tmp_path / "stages" / name / "best" / "metrics.json").write_text(json.dumps(metrics))
    best = best_checkpoint(tmp_path, ["stage-1", "stage-2", "stage-3", "stage-4"])
    assert best == {
        "model": str(tmp_path / "stages" / "stage-3" / "best"),
        "stage": "stage-3",
        "step": 9,
        "dev_rougeL": 25.0,
    }
    assert best_checkpoint(tmp_path, ["stage-4"]) is None and best_checkpoint(tmp_path, ["stage-9"]) is None


def test_eval_of_baseline_needs_compare_baseline(tmp_path, tiny_models, srd_data, capsys):
    args = _args("run", tiny_models, srd_data, tmp_path, "eval.benchmarks=[dolly-eval]", "eval.models=[baseline]")
    assert main(args) == 2
    assert "compare.baseline=true" in capsys.readouterr().err


def test_reflection_in_bf16_and_training_on_in_float32(tmp_path, tiny_models, srd_data, monkeypatch):
    """generation.dtype=bfloat16: reflection decodes and scores with bf16 weights, says so in its
    meta (a float32 rerun of that folder is refused), and the stages train the float32 student.
    float32 reflections name no dtype, so those made before the option still resume."""
    real_iter, real_stats, seen = reflect_mod.iter_responses, reflect_mod.sequence_stats, []

    def spy(fn, what):
        def wrapped(model, *a, **k):
            seen.append((what, next(model.parameters()).dtype))
            return fn(model, *a, **k)

        return wrapped

    monkeypatch.setattr(reflect_mod, "iter_responses", spy(real_iter, "generate"))
    monkeypatch.setattr(reflect_mod, "sequence_stats", spy(real_stats, "stats"))
    monkeypatch.setattr(loop_mod, "generate_responses", spy(loop_mod.generate_responses, "dev"))
    args = _args("run", tiny_models, srd_data, tmp_path, "generation.dtype=bfloat16", "dev_eval.num_examples=2")
    assert main(args) == 0
    run = tmp_path / "x"
    assert {dtype for _, dtype in seen} == {torch.bfloat16} and {w for w, _ in seen} == {"generate", "stats", "dev"}
    assert json.loads((run / "reflection" / "meta.json").read_text())["settings"]["dtype"] == "bfloat16"
    final = Path(json.loads((run / "results.json").read_text())["final_model"])
    assert json.loads((final / "config.json").read_text())["dtype"] == "float32" and len(_manifest(run)) == 20
    assert main(_args("reflect", tiny_models, srd_data, tmp_path, "generation.dtype=float32")) == 2
    assert main(_args("reflect", tiny_models, srd_data, tmp_path / "fp32")) == 0
    assert "dtype" not in json.loads((tmp_path / "fp32" / "x" / "reflection" / "meta.json").read_text())["settings"]


@pytest.mark.parametrize("cmd", ["reflect", "run", "train"])
def test_bad_data_and_missing_models_are_found_before_any_weights_load(
    tmp_path, tiny_models, srd_data, monkeypatch, capsys, cmd
):
    import srd.recipes.train as recipe_mod

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the inputs were checked")

    monkeypatch.setattr(recipe_mod, "load_model", no_weights)
    monkeypatch.setattr(recipe_mod, "load_tokenizer", no_weights)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    args = [
        a if not a.startswith("data.train=") else f"data.train={bad}"
        for a in _args(cmd, tiny_models, srd_data, tmp_path)
    ]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert str(bad) in err and "line 2" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()  # no run folder made for a run that cannot start
    # a student folder that does not exist: one line naming it, also before the teacher loads
    args = [
        a if not a.startswith("model.student=") else f"model.student={tmp_path / 'runs' / 'students' / 'none'}"
        for a in _args(cmd, tiny_models, srd_data, tmp_path)
    ]
    assert main(args) != 0
    err = capsys.readouterr().err
    assert "students/none does not exist" in err and "Traceback" not in err


def test_eval_and_prune_check_their_inputs_before_any_weights_load(tmp_path, tiny_models, monkeypatch, capsys):
    import srd.models
    import srd.models.load
    import srd.models.prune
    import srd.recipes.prune

    def no_weights(*a, **k):
        raise AssertionError("weights were read before the inputs were checked")

    for module in (srd.models, srd.models.load, srd.models.prune, srd.recipes.prune):
        monkeypatch.setattr(module, "load_model", no_weights)
        monkeypatch.setattr(module, "load_tokenizer", no_weights)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(ROWS[0]) + "\n{not json\n")
    student = str(tiny_models["llama-student"])
    prune = ["prune", "--teacher", str(tiny_models["llama-teacher"]), "--layers", "1", "--out", str(tmp_path / "p")]
    for args in (
        ["eval", student, "--benchmarks", str(bad), "--greedy"],
        [*prune, "--data", str(bad)],
        [*prune, "--data", str(bad.with_name("ok.jsonl")), "--heal-steps", "2", "--heal-data", str(bad)],
    ):
        bad.with_name("ok.jsonl").write_text(json.dumps(ROWS[0]) + "\n")
        assert main(args) != 0, args
        err = capsys.readouterr().err
        assert str(bad) in err and "line 2" in err and "Traceback" not in err, err
    for args in (
        ["eval", str(tmp_path / "runs" / "students" / "none"), "--benchmarks", str(bad), "--greedy"],
        ["prune", "--teacher", str(tmp_path / "runs" / "none"), "--layers", "1", "--out", str(tmp_path / "p")],
    ):
        assert main(args) != 0, args
        err = capsys.readouterr().err
        assert "does not exist" in err and "Traceback" not in err, err
    assert not (tmp_path / "p").exists()
