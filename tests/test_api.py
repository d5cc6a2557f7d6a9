"""The public Python API (srd/__init__.py) and the README's Python example, run on tiny models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import srd
from tests.test_srd_run import srd_data  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def test_public_names_resolve_and_unknown_ones_say_what_exists():
    for name in srd.__all__:
        assert getattr(srd, name) is not None
    with pytest.raises(AttributeError, match="the public API is"):
        srd.no_such_thing  # noqa: B018


def test_readme_python_example_runs(tmp_path, tiny_models, srd_data, monkeypatch, capsys):  # noqa: F811
    block = re.search(r"<!-- python-example[^>]*-->\n```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "the README's Python example is missing"
    tiny = [
        f"model.teacher={tiny_models['llama-teacher']}",
        f"model.student={tiny_models['llama-student']}",
        f"data.train={srd_data['train']}",
        f"data.dev={srd_data['dev']}",
        f"output_dir={tmp_path}",
        "data.max_prompt_len=64",
        "data.max_len=96",
        "data.train_limit=12",
        "data.dev_limit=4",
        "loss.teacher_top_k=4",
        "curriculum.epochs_per_stage=1",
        "train.batch_size=2",
        "train.eval_every=2",
        "train.precision=fp32",
        "generation.max_new_tokens=4",
        "dev_eval.num_examples=2",
        "dev_eval.max_new_tokens=4",
        f"eval.benchmarks=[{srd_data['dev']}]",
        "eval.limit=4",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
    ]
    load = srd.load_config
    monkeypatch.setattr(srd, "load_config", lambda path, overrides=(): load(path, [*overrides, *tiny]))
    monkeypatch.chdir(ROOT)  # the example names configs/quickstart.yaml
    exec(compile(block.group(1), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "% of KD's time" in out and "9 of 12 kept; stages of [3, 6, 9] examples" in out
    assert "| KD |" in out and "significant" in out  # the comparison with its words
    assert (tmp_path / "api-demo" / "report.md").exists()
