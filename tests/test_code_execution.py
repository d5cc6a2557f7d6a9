"""Model-written and data-supplied code runs only when the user asked twice (a config key and an
environment variable), and what runs cannot flood or stall the evaluator."""

from __future__ import annotations

import json
import os
import time

import pytest

import srd.eval.evaluate
import srd.models.load
from srd.cli import main
from srd.metrics.sandbox import CodeExecutionRefused, _read_until, run_tests
from tests.test_srd_run import _args, srd_data  # noqa: F401 (a fixture)

MBPP_ROW = {
    "task_id": 1,
    "text": "Write a function add(a, b).",
    "code": "def add(a, b):\n    return a + b",
    "test_list": ["assert add(1, 2) == 3"],
}


def test_run_tests_refuses_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv("SRD_ALLOW_CODE_EXECUTION", raising=False)
    with pytest.raises(CodeExecutionRefused, match="SRD_ALLOW_CODE_EXECUTION=1"):
        run_tests("x = 1", ["assert x == 1"])


@pytest.mark.parametrize(
    "flag,env,wants",
    [
        ([], None, ["--allow-code-execution", "SRD_ALLOW_CODE_EXECUTION=1"]),
        (["--allow-code-execution"], None, ["SRD_ALLOW_CODE_EXECUTION=1"]),
        ([], "1", ["--allow-code-execution"]),
    ],
)
def test_mbpp_needs_both_switches_before_any_weights_load(tmp_path, tiny_models, monkeypatch, capsys, flag, env, wants):
    if env is None:
        monkeypatch.delenv("SRD_ALLOW_CODE_EXECUTION", raising=False)
    else:
        monkeypatch.setenv("SRD_ALLOW_CODE_EXECUTION", env)
    for module in (srd.eval.evaluate, srd.models.load):
        monkeypatch.setattr(module, "load_model", lambda *a, **k: pytest.fail("weights were read"))
    args = ["eval", str(tiny_models["llama-student"]), "--benchmarks", "mbpp", "--out", str(tmp_path / "e"), *flag]
    assert main(args) == 2
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if "error" in x)
    assert "Traceback" not in err and "benchmark mbpp runs model-written programs" in line
    assert all(w in line for w in wants), line
    assert not (tmp_path / "e").exists()


def test_a_code_running_scorer_needs_both_switches(tmp_path, tiny_models, srd_data, monkeypatch, capsys):  # noqa: F811
    monkeypatch.delenv("SRD_ALLOW_CODE_EXECUTION", raising=False)
    args = _args("reflect", tiny_models, srd_data, tmp_path, "reflect.scorers=[rouge_l, tests_pass]")
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "reflect.scorers tests_pass runs model-written programs" in err and "Traceback" not in err
    assert not (tmp_path / "x" / "reflection").exists()
    monkeypatch.setenv("SRD_ALLOW_CODE_EXECUTION", "1")
    assert main([*args, "allow_code_execution=true"]) == 0  # asked twice: it runs


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("SRD_ALLOW_CODE_EXECUTION", "1")


def test_the_program_does_not_see_the_evaluators_environment(allowed, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    res = run_tests(
        "import os\nseen = dict(os.environ)", ["assert 'HF_TOKEN' not in seen", "assert 'hf_secret' not in str(seen)"]
    )
    assert res.all_passed, res


def test_a_flood_on_stderr_is_bounded_and_fails_the_sample(allowed):
    code = "import sys\nfor _ in range(10_000):\n    sys.stderr.write('x' * 100_000)\n"  # 1 GB if unbounded
    t0 = time.monotonic()
    res = run_tests(code, ["assert True"], timeout_s=10)
    assert not res.all_passed and time.monotonic() - t0 < 15
    assert res.error is None or len(res.error) <= 300


def test_a_result_not_written_by_the_harness_fails_the_sample(allowed):
    # a program that writes its own verdict (too many outcomes) on the result pipe and exits first
    code = "import os, sys\nos.write(int(sys.argv[1]), b'{\"outcomes\": [true, true, true]}')\nos._exit(0)\n"
    res = run_tests(code, ["assert False"])
    assert not res.all_passed and res.status == "crashed"


def test_a_writer_left_holding_the_result_pipe_cannot_stall_the_evaluator():
    r, w = os.pipe()
    os.write(w, json.dumps({"outcomes": [True]}).encode())
    t0 = time.monotonic()
    text = _read_until(r, time.monotonic() + 0.5, limit=1 << 20)  # w stays open, as a descendant's would
    assert time.monotonic() - t0 < 2 and json.loads(text) == {"outcomes": [True]}
    os.close(w)
    r, w = os.pipe()
    os.write(w, b"y" * 60_000)  # within the pipe's buffer: no reader needed to write it
    assert len(_read_until(r, time.monotonic() + 1, limit=10_000)) == 10_000  # and cannot flood it
    os.close(w)
