"""Metrics by hand: ROUGE-L, BLEU, answer extraction; the code sandbox's defences."""

from __future__ import annotations

import os
import time

import pytest

from srd.metrics.answers import answers_match, extract_answer
from srd.metrics.sandbox import extract_code, run_tests
from srd.metrics.text import corpus_bleu, rouge_l


@pytest.fixture(autouse=True)
def _code_execution_allowed(monkeypatch):
    """These tests are about the sandbox itself: the user allowed code execution."""
    monkeypatch.setenv("SRD_ALLOW_CODE_EXECUTION", "1")


def test_rouge_l_by_hand():
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; P = 5/6, R = 5/5
    p, r = 5 / 6, 1.0
    assert rouge_l("the cat sat on the mat", "the cat on the mat") == pytest.approx(100 * 2 * p * r / (p + r))
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("running dogs", "run dog") == pytest.approx(100.0)  # Porter stemming
    # several references: the maximum
    assert rouge_l("a b c", ["x y z", "a b c"]) == pytest.approx(100.0)


def test_corpus_bleu():
    assert corpus_bleu(["the cat sat on the mat"], [["the cat sat on the mat"]]) == pytest.approx(100.0)
    assert corpus_bleu(["completely different words here"], [["the cat sat on the mat"]]) < 5
    # multiple references per segment are allowed
    assert corpus_bleu(["a b c d e"], [["x", "a b c d e"]]) == pytest.approx(100.0)


@pytest.mark.parametrize(
    "text,want",
    [
        ("so the answer is \\boxed{1,234}.", "1234"),
        ("Natalia sold 72 clips.\n#### 72", "72"),
        ("The total is $18.00.", "18"),
        ("She lost -5 points", "-5"),
        ("\\boxed{-0.5}", "-0.5"),
        ("\\boxed{\\frac{3}{4}}", "0.75"),
        ("It is 7.", "7"),
        ("first 3 then 12,000,000 people", "12000000"),
        ("the answer is 2.50 dollars", "2.5"),
        ("no numbers at all", None),
        ("\\boxed{x+1}", "1"),
    ],
)
def test_answer_extraction(text, want):
    assert extract_answer(text) == want


def test_answers_match():
    assert answers_match("... so \\boxed{72}", "48/2 = 24\n#### 72")
    assert answers_match("The answer is 1,000", "#### 1000")
    assert not answers_match("The answer is 71", "#### 72")
    assert not answers_match("I don't know", "#### 72")


ADD = "def add(a, b):\n    return a + b\n"


def test_sandbox_passes_and_counts_asserts():
    res = run_tests(ADD, ["assert add(1, 2) == 3", "assert add(2, 2) == 5", "assert add(0, 0) == 0"])
    assert (res.passed, res.total, res.status) == (2, 3, "failed") and res.outcomes == [True, False, True]
    assert run_tests(ADD, ["assert add(1, 2) == 3"]).all_passed
    assert run_tests("def add(:", ["assert add(1, 2) == 3"]).passed == 0  # syntax error fails, no crash
    assert run_tests("import math\nx = math.sqrt(16)", ["assert x == 4.0"], setup="").all_passed


def test_infinite_loop_times_out():
    t0 = time.perf_counter()
    res = run_tests("while True:\n    pass\n", ["assert True"], timeout_s=2)
    assert res.status == "timeout" and not res.all_passed
    assert time.perf_counter() - t0 < 10


def test_fork_bomb_is_stopped():
    code = "import os\nwhile True:\n    os.fork()\n"
    res = run_tests(code, ["assert True"], timeout_s=5)
    assert not res.all_passed and "disabled" in (res.error or "")
    code = "import subprocess\nsubprocess.Popen(['sleep', '100'])\n"
    assert not run_tests(code, ["assert True"]).all_passed
    code = "import multiprocessing\n"
    assert not run_tests(code, ["assert True"]).all_passed


def test_writes_outside_the_sandbox_fail(tmp_path):
    target = tmp_path / "pwned.txt"
    code = f"open({str(target)!r}, 'w').write('x')\n"
    res = run_tests(code, ["assert True"])
    assert not res.all_passed and not target.exists()
    victim = tmp_path / "keep.txt"
    victim.write_text("data")
    res = run_tests(f"import os\nos.remove({str(victim)!r})\n", ["assert True"])
    assert not res.all_passed and victim.read_text() == "data"
    # writing inside its own working directory is fine
    assert run_tests("open('scratch.txt', 'w').write('ok')\n", ["assert open('scratch.txt').read() == 'ok'"]).all_passed


def test_network_is_disabled():
    code = "import socket\ns = socket.create_connection(('127.0.0.1', 9))\n"
    res = run_tests(code, ["assert True"])
    assert not res.all_passed and "disabled" in (res.error or "")
    code = "import urllib.request\nurllib.request.urlopen('http://127.0.0.1:9', timeout=1)\n"
    assert not run_tests(code, ["assert True"]).all_passed


def test_memory_hog_is_contained():
    res = run_tests("x = bytearray(4 << 30)\n", ["assert True"], memory_mb=256)
    assert not res.all_passed
    assert os.getpid() > 0  # we are still here


def test_extract_code():
    assert extract_code("Here:\n```python\ndef f():\n    return 1\n```\nDone") == "def f():\n    return 1\n"
    assert extract_code("def f():\n    return 1") == "def f():\n    return 1"
