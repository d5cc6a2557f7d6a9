"""srd report's plots: no empty panel whatever the run logged."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib.image

from srd.report import _plot_training


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
