"""benchmarks/same_numbers.py: two run folders compared number by number, times left out."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _module():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location("same_numbers", ROOT / "benchmarks" / "same_numbers.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _run(folder: Path, loss: float, elapsed: float) -> Path:
    logs = folder / "stages" / "stage-1" / "logs"
    logs.mkdir(parents=True)
    rows = [{"step": 1, "loss": loss, "elapsed_s": elapsed, "tokens_per_s": 10 * elapsed}]
    (logs / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_times_differ_numbers_do_not(tmp_path, capsys):
    same = _module()
    a = _run(tmp_path / "a", 1.25, 3.0)
    assert same.main([str(a), str(_run(tmp_path / "b", 1.25, 7.5))]) == 0  # only the times differ
    assert "identical" in capsys.readouterr().out
    assert same.main([str(a), str(_run(tmp_path / "c", 1.2500001, 3.0))]) == 1  # a loss moved
    assert "DIFFERENT" in capsys.readouterr().out
    (tmp_path / "c" / "reflection").mkdir()
    (tmp_path / "c" / "reflection" / "manifest.jsonl").write_text('{"id": "x"}\n')
    assert same.main([str(a), str(tmp_path / "c")]) == 1
    assert "only in the second run" in capsys.readouterr().out
