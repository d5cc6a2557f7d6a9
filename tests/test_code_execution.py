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
from srd.metrics import sandbox
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


# -- each escape a program might try: it fails the sample, changes nothing outside its folder, and
# the evaluator answers within seconds. Every case runs twice: under the operating system's
# isolation where this machine allows it, and under the in-process guard alone.


@pytest.fixture(params=["os", "guard-only"])
def layer(request, allowed, monkeypatch):
    if request.param == "guard-only":
        monkeypatch.setattr(sandbox, "_ISOLATION", sandbox.Isolation((), False, False, "none (test)"))
    return request.param


def _fails(code: str, tests=("assert True",), **kw) -> sandbox.TestResult:
    t0 = time.monotonic()
    res = run_tests(code, list(tests), **kw)
    assert time.monotonic() - t0 < 15, "the evaluator was held"
    assert not res.all_passed, res
    return res


def _escapes_outside(target):
    rel = "../" * 20 + str(target).lstrip("/")
    return {
        "open": f"open({str(target)!r}, 'w').write('x')",
        "FileIO": f"import io\nio.FileIO({str(target)!r}, 'w').write(b'x')",
        "os.open": f"import os\nos.write(os.open({str(target)!r}, os.O_WRONLY | os.O_CREAT), b'x')",
        "dir_fd": f"import os\nd = os.open('.', os.O_RDONLY)\nos.open({rel!r}, os.O_WRONLY | os.O_CREAT, dir_fd=d)",
        "pathlike": f"import pathlib\npathlib.Path({str(target)!r}).write_text('x')",
        "mode-subclass": f"class M(str):\n    def __contains__(self, c):\n        return False\n"
        f"open({str(target)!r}, M('w')).write('x')",
        "symlink": f"import os\nos.symlink({str(target)!r}, 'link')\nopen('link', 'w').write('x')",
        "chdir": f"import os\nos.chdir({str(target.parent)!r})\nopen({target.name!r}, 'w').write('x')",
    }


@pytest.mark.parametrize("how", list(_escapes_outside(__import__("pathlib").Path("/x/y"))))
def test_a_write_outside_its_folder_fails(layer, tmp_path, how):
    target = tmp_path / "pwned.txt"
    _fails(_escapes_outside(target)[how])
    assert not target.exists() and sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "code",
    [
        "import posix\nposix.unlink(VICTIM)",
        "import os\nos.rename(VICTIM, 'mine.txt')",
        "import os\nos.chmod(VICTIM, 0)",
        "import os\nos.truncate(VICTIM, 0)",
        "import shutil\nshutil.rmtree(FOLDER)",
        "import shutil\nshutil.move(VICTIM, 'mine.txt')",
        "import os\nos.utime(VICTIM, (0, 0))",
        "import os\nos.link(VICTIM, 'mine.txt')\nopen('mine.txt', 'w').write('x')",
    ],
)
def test_a_delete_or_change_outside_its_folder_fails(layer, tmp_path, code):
    folder = tmp_path / "data"
    folder.mkdir()
    victim = folder / "keep.txt"
    victim.write_text("data")
    before = victim.stat()
    _fails(code.replace("VICTIM", repr(str(victim))).replace("FOLDER", repr(str(folder))))
    after = victim.stat()
    assert victim.read_text() == "data" and (after.st_mode, after.st_mtime) == (before.st_mode, before.st_mtime)


@pytest.mark.parametrize(
    "code",
    [
        "import socket\nsocket.socket().connect(('127.0.0.1', PORT))",
        "import _socket\n_socket.socket().connect(('127.0.0.1', PORT))",
        "import socket\nsocket.create_connection(('127.0.0.1', PORT), timeout=2)",
    ],
)
def test_a_network_connection_fails(layer, code):
    import socket

    with socket.socket() as server:  # something listening on the evaluator's machine
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        server.settimeout(0.2)
        _fails(code.replace("PORT", str(port)))
        with pytest.raises(TimeoutError):
            server.accept()  # nobody came


def test_the_network_namespace_has_nothing_reachable_even_without_the_guard(allowed):
    """The operating-system layer on its own: a plain Python under isolation().prefix (no audit
    hook) cannot reach a server on the evaluator's loopback."""
    import socket
    import subprocess
    import sys

    iso = sandbox.isolation()
    if not iso.network:
        pytest.skip(f"this machine allows no network namespace ({iso.description})")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        code = (
            f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
            "except OSError:\n    raise SystemExit(3)"
        )
        assert subprocess.run([*iso.prefix, sys.executable, "-I", "-S", "-c", code], timeout=30).returncode == 3


@pytest.mark.parametrize(
    "code",
    [
        "import posix\nposix.fork()",
        "import os\nos.posix_spawn('/bin/sleep', ['sleep', '60'], {})",
        "import _posixsubprocess",
        "import os\nos.system('sleep 60 &')",
        "import os\nos.execv('/bin/sh', ['sh', '-c', 'sleep 60'])",
        "import os\nos.setsid()",
        "import os\nos.setuid(0)",
        "import os\nos.kill(os.getppid(), 9)",
        "import pty\npty.fork()",
    ],
)
def test_a_new_process_or_a_signal_fails(layer, code):
    _fails(code, timeout_s=5)


def test_the_program_is_not_root_where_the_machine_allows_a_user_namespace(allowed):
    iso = sandbox.isolation()
    if not iso.user:
        pytest.skip(f"this machine allows no user namespace ({iso.description})")
    res = run_tests("import os\nuid = os.getuid()", ["assert uid != 0"])
    assert res.all_passed, res


def test_the_evaluators_files_and_process_are_out_of_reach(layer, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    secret = tmp_path / "token"
    secret.write_text("hf_secret")
    for code in (
        "import os\nseen = open(f'/proc/{os.getppid()}/environ', 'rb').read()",
        "seen = open('/proc/self/environ', 'rb').read()",
        f"seen = open({str(secret)!r}).read()",
        "seen = open('/proc/self/mem', 'rb')",
        "import os\nseen = os.open('/proc/self/cmdline', os.O_RDONLY)",
    ):
        _fails(code, ["assert seen is not None"])


# what a program would do with a frame: walk up to the harness's, take its token and descriptor,
# and write a passing verdict of its own
_ATTACK = """
import os
def attack(f):
    while f is not None:
        seen = f.f_locals
        if "token" in seen and "fd" in seen:
            os.write(seen["fd"], (seen["token"] + "\\n1\\n").encode())
            os._exit(0)
        f = f.f_back
"""


@pytest.mark.parametrize(
    "code",
    [
        # a verdict of its own on every descriptor it might guess, then an exit before the tests
        "import os\nfor fd in range(3, 40):\n    for text in (b'{\"outcomes\": [true]}', b'0' * 32 + b'\\n1\\n'):\n"
        "        try:\n            os.write(fd, text)\n        except OSError:\n            pass\nos._exit(0)",
        # the harness's own functions replaced
        "import builtins\nbuiltins.exec = lambda *a, **k: None\nbuiltins.compile = lambda *a, **k: None",
        # a builtin the test uses rebound
        "def len(x):\n    return 3",
        "import builtins\nbuiltins.len = lambda x: 3",
        # the harness's frame, reached through a traceback, sys._getframe, a running generator,
        # the garbage collector, a trace function or a signal handler
        _ATTACK + "try:\n    raise ValueError\nexcept ValueError as e:\n    attack(e.__traceback__.tb_frame)",
        _ATTACK + "import sys\nattack(sys._getframe())",
        _ATTACK + "import sys\nfor f in sys._current_frames().values():\n    attack(f)",
        _ATTACK + "def g():\n    attack(me.gi_frame)\n    yield\nme = g()\nnext(me)",
        # the tests' copy of the builtins, found through the garbage collector
        "import builtins, gc\nfor o in gc.get_objects():\n"
        "    if type(o) is dict and '__build_class__' in o and o is not vars(builtins):\n"
        "        o['len'] = lambda x: 3",
        _ATTACK + "import sys\nsys.settrace(lambda frame, event, arg: attack(frame))",
        _ATTACK + "import signal\nsignal.signal(signal.SIGALRM, lambda s, f: attack(f))\n"
        "signal.setitimer(signal.ITIMER_REAL, 0.01)\nfor i in range(10 ** 8):\n    pass",
    ],
)
def test_a_program_cannot_forge_its_verdict(layer, code):
    res = _fails(code, ["assert len([1]) == 3"])
    assert res.outcomes in ([False], [])


@pytest.mark.parametrize(
    "code",
    [
        "import ctypes",
        "import mmap",
        "import sys\nsys.setprofile(lambda *a: None)",
        "import gc\ngc.get_referents(1)",
        "import __main__\n__main__._harness.__code__ = (lambda: None).__code__",
        "import resource\nresource.setrlimit(resource.RLIMIT_CPU, (1, 1))",
        "import os\nos.putenv('X', '1')",
    ],
)
def test_what_a_forger_or_an_escape_would_need_is_refused(layer, code):
    _fails(code)


_ALWAYS = (
    "class Yes:\n    def __eq__(self, other):\n        return True\n"
    "    def __ne__(self, other):\n        return False\n"
    "    def __lt__(self, other):\n        return True\n    def __contains__(self, other):\n        return True\n"
    "    def __bool__(self):\n        return True\n"
    "class Four(int):\n    def __eq__(self, other):\n        return True\n    __hash__ = int.__hash__\n"
    "class Tup(tuple):\n    def __eq__(self, other):\n        return True\n"
)


@pytest.mark.parametrize(
    "answer,test",
    [
        ("Yes()", "assert f(1) == 5"),
        ("Yes()", "assert not (f(1) != 5)"),
        ("Yes()", "assert f(1) < 0"),
        ("Yes()", "assert 3 in f(1)"),
        ("Yes()", "assert [f(1)] == [5]"),
        ("Four(4)", "assert f(1) == 5"),  # a subclass of int is compared by its int value
        ("Four(4)", "assert {1: f(1)} == {1: 5}"),
        ("Tup((1,))", "assert f(1) == (2,)"),
    ],
)
def test_an_object_that_says_yes_to_every_comparison_fails(layer, answer, test):
    """Tests compare values, not the program's objects: an answer whose ==, !=, <, or `in`
    always agrees (or an int or tuple subclass that lies about its value) fails."""
    _fails(_ALWAYS + f"def f(x):\n    return {answer}", [test])


def test_comparing_by_value_keeps_what_python_calls_equal(allowed):
    code = (
        "import collections\nP = collections.namedtuple('P', 'x y')\n"
        "def f():\n    return P(1, 2)\n"
        "def g():\n    return collections.Counter('aab')\n"
        "def h():\n    return collections.OrderedDict([(1, [2.0, {3}])])\n"
    )
    tests = [
        "assert f() == (1, 2)",
        "assert g() == {'a': 2, 'b': 1}",
        "assert h() == {1: [2, {3}]}",  # 2.0 == 2, nested
        "assert f() != (2, 1) and (1, 2) == f()",
        "assert 'b' in g() and 1 in f() and 'ell' in 'hello'",
        "assert f() < (1, 3) and 2.5 >= 2",
        "assert [1, 2] != (1, 2)",  # a list is not a tuple, as in Python
    ]
    res = run_tests(code, tests)
    assert res.all_passed, res


def test_the_programs_own_audit_hook_is_not_added(layer):
    code = "import sys\ncalled = []\nsys.addaudithook(lambda event, args: called.append(event))\nimport json"
    assert run_tests(code, ["assert called == []"]).all_passed


def test_a_task_may_ask_for_a_name_that_shadows_a_builtin(allowed):
    # MBPP task 126 asks for `sum`: the reference's names reach the tests, no others
    code = "def sum(a, b):\n    return 6\ndef len(x):\n    return 3"
    res = run_tests(code, ["assert sum(10, 15) == 6", "assert len([1]) == 3"], entry_points={"sum"})
    assert res.outcomes == [True, False]
    assert sandbox.defined_names("def sum(a, b):\n    pass\nclass Node:\n    pass\nx = 1") == {"sum", "Node"}


def test_the_tasks_setup_runs_after_the_program(allowed):
    # MBPP's setup builds trees from the Node class the program defines
    code = "class Node:\n    def __init__(self, v):\n        self.v = v\ndef value(n):\n    return n.v"
    assert run_tests(code, ["assert value(root) == 1"], setup="root = Node(1)").all_passed


def test_a_process_left_in_the_session_is_killed(tmp_path):
    """The evaluator's sweep kills what the program's session still holds, also a process that
    moved to a group of its own."""
    import subprocess
    import sys

    pid_file = tmp_path / "pid"
    code = (
        "import os, sys, time\npid = os.fork()\nif pid == 0:\n    os.setpgid(0, 0)\n    time.sleep(60)\n"
        f"else:\n    open({str(pid_file)!r}, 'w').write(str(pid))\n    time.sleep(60)"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    deadline = time.monotonic() + 10
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    assert os.getpgid(child) != leader.pid  # outside the group: killpg alone would miss it
    sandbox._kill_session(leader.pid)
    leader.wait(timeout=5)
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        # a zombie until its parent is reaped: gone once the leader died and init reaped it
        with open(f"/proc/{child}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":
                break
        time.sleep(0.05)
    else:
        pytest.fail("the process left in the session is still running")
