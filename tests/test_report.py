"""srd report: no empty plot panel whatever the run logged; the timing caveat when the machine's speed moved."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image

from srd.report import _plot_training, speed_caveat, speed_spread


def _stage(run: Path, name: str, evals: list[dict]) -> None:
    logs = run / "stages" / name / "logs"
    logs.mkdir(parents=True)
    train = [{"step": s, "loss": 2.0 - 0.1 * s, "tau": 1.0, "alpha": 0.2} for s in range(1, 5)]
    (logs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (logs / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in evals))


def _width(png: Path) -> int:
    return matplotlib.image.imread(png).shape[1]


def test_training_plot_has_a_dev_panel_only_when_there_is_a_dev_curve(tmp_path):
    widths = {}
    cases = {
        "rouge": [{"step": 0, "dev_ce": 3.0, "dev_rougeL": 10.0}, {"step": 4, "dev_ce": 2.5, "dev_rougeL": 12.0}],
        "ce": [{"step": 0, "dev_ce": 3.0, "dev_loss": 1.0}, {"step": 4, "dev_ce": 2.5, "dev_loss": 0.9}],
        "none": [],
    }
    for case, evals in cases.items():
        run = tmp_path / case
        _stage(run, "baseline", evals)
        plots = run / "plots"
        plots.mkdir()
        assert _plot_training(run, plots) == ["training.png"]
        widths[case] = _width(plots / "training.png")
    # two panels (loss + dev ROUGE-L, or loss + dev CE when no answers were generated), else one
    assert widths["rouge"] == widths["ce"] > 1.5 * widths["none"]


def _rates(run: Path, stage: str, rates: list[float]) -> Path:
    logs = run / "stages" / stage / "logs"
    logs.mkdir(parents=True)
    rows = [{"step": i + 1, "elapsed_s": float(i + 1), "tokens_per_s": r} for i, r in enumerate(rates)]
    (logs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run / "stages" / stage


def test_speed_spread_measures_how_far_the_machine_speed_moved(tmp_path):
    """The fastest 25-step block's median tokens/s over the slowest's, across stages, each stage's
    first two steps left out: 1.0 steady, 2.0 when the second block ran at half speed, None
    without a full block (26 rows: a full block only if the warm-up counted)."""
    warm_up = [1.0, 3.0]
    steady = _rates(tmp_path / "a", "stage-1", warm_up + [100.0] * 50)
    assert speed_spread([steady]) == 1.0
    assert speed_spread([_rates(tmp_path / "b", "stage-1", warm_up + [100.0] * 25 + [50.0] * 25)]) == 2.0
    assert speed_spread([steady, _rates(tmp_path / "a", "stage-2", warm_up + [80.0] * 30)]) == 1.25
    assert speed_spread([_rates(tmp_path / "c", "stage-1", warm_up + [100.0] * 24)]) is None


def test_the_timing_caveat_names_the_method_whose_speed_moved(tmp_path):
    run = tmp_path / "run"
    _rates(run, "stage-1", [100.0] * 27)
    _rates(run / "baseline", "baseline", [100.0] * 52)
    assert speed_caveat(run) is None  # both steady
    (run / "baseline" / "stages").rename(tmp_path / "steady-baseline")
    _rates(run / "baseline", "baseline", [100.0] * 27 + [40.0] * 25)
    caveat = speed_caveat(run)
    assert caveat is not None and "2.5x in the KD baseline" in caveat and "in SRD" not in caveat


def test_scores_by_benchmark_reads_finished_answers_only(tmp_path):
    from srd.report import scores_by_benchmark

    ev = tmp_path / "eval" / "greedy"
    for bench, rows in (("b", {"x": 10.0, "y": 30.0}), ("c", {"x": 5.0})):
        (ev / bench).mkdir(parents=True)
        (ev / bench / "greedy.jsonl").write_text(
            "".join(json.dumps({"id": i, "score": v}) + "\n" for i, v in rows.items())
        )
    (ev / "summary.json").write_text(json.dumps({"benchmarks": {"b": {"per_seed": {"greedy": 20.0}}}}))
    # c: answers written, not yet in the summary (being evaluated); notes: another tool's folder
    (ev / "notes").mkdir()
    (ev / "notes" / "greedy.jsonl").write_text(json.dumps({"id": "x", "score": 99.0}) + "\n")
    assert scores_by_benchmark(ev) == {"b": {"x": 10.0, "y": 30.0}}
    (ev / "summary.json").write_text(
        json.dumps({"benchmarks": {"b": {"per_seed": {"greedy": 20.0}}, "c": {"per_seed": {"greedy": 5.0}}}})
    )
    assert scores_by_benchmark(ev) == {"b": {"x": 10.0, "y": 30.0}, "c": {"x": 5.0}}


def test_a_run_keeps_where_each_of_its_commands_ran(tmp_path, tiny_models, tiny_data, capsys):
    """environment.jsonl: one line per command started in the run (srd, libraries, machine); the
    report says where it ran, and that its wall times mix two environments when a resume ran
    elsewhere. A line a kill tore is skipped. `srd env` prints the same for a bug report."""
    from srd.cli import main
    from srd.runtime import environment
    from tests.test_train import _args as _train_args

    args = _train_args(tiny_models, tiny_data, tmp_path, "llama", "train.save_every=1")
    assert main([*args, "train.stop_after_steps=1"]) == 0
    assert main(args) == 0  # resumed
    log = tmp_path / "t" / "environment.jsonl"
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    here = environment()
    assert len(lines) == 2 and all({k: v for k, v in r.items() if k not in ("at", "argv")} == here for r in lines)
    assert "train.stop_after_steps=1" in lines[0]["argv"] and "train.stop_after_steps" not in lines[1]["argv"]
    assert main(["report", str(tmp_path / "t")]) == 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert "## Where it ran" in report and f"(2 commands): srd {here['srd']}, " in report
    assert f"torch {here['torch']}" in report and "different machines" not in report and "One machine" not in report
    # resumed on another machine (another torch), and a line cut short by a kill
    elsewhere = {**lines[1], "torch": "0.0-other", "cpu_isa": "AVX512"}
    log.write_text(log.read_text() + json.dumps(elsewhere) + "\n" + '{"at": "2026-')
    assert main(["report", str(tmp_path / "t")]) == 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert "torch 0.0-other" in report and "Its commands ran on 2 different machines: its wall times mix them" in report
    # the same machine, another srd commit: listed, but no mixing of machines said
    log.write_text(
        "\n".join(log.read_text().splitlines()[:2]) + "\n" + json.dumps({**lines[1], "srd_commit": "x"}) + "\n"
    )
    assert main(["report", str(tmp_path / "t")]) == 0
    report = (tmp_path / "t" / "report.md").read_text()
    assert "srd_commit x" in report and "One machine throughout" in report and "different machines" not in report
    capsys.readouterr()
    assert main(["env"]) == 0
    printed = capsys.readouterr().out
    assert f"torch: {here['torch']}\n" in printed and f"srd: {here['srd']}\n" in printed and "cpu_isa: " in printed
