"""Run generated code against assert-style tests in a sandboxed subprocess (MBPP pass@1).

Three layers, each with its tests (tests/test_code_execution.py, tests/test_eval_metrics.py):
  * the operating system, where it allows (`isolation()`): a user namespace in which the
    program is `nobody` with no capabilities outside it (so a root evaluator's program is not
    root, and process limits apply), and a network namespace with no interface up;
  * the process: a fresh Python (-I -S -B) in its own session and temporary directory, with
    wall-clock, CPU, memory, file-size and process limits; at the end every process left in
    its session is killed, and the evaluator reads the result with a deadline and a size cap;
  * the interpreter: an audit hook, installed before the program runs and impossible to
    remove from Python, refuses process creation, signals, sockets, ctypes, mmap, frames, the
    garbage collector's object lists, tracing, file writes outside the directory and reads
    outside it and the standard library (so /proc and the evaluator's files are out of reach).

The verdict cannot be written by the program: the harness keeps a random token the program
cannot read (frames, memory and the evaluator's environment are out of its reach) and the
evaluator accepts only outcomes that follow it; tests run with the real builtins, not names
the program rebound, and their comparisons are made on values copied into plain builtins, not
by the program's objects (an answer whose `==` always says yes fails). What stays possible,
and is documented: rewriting a standard module a test uses while the test runs. It guards
against accidents and careless or adversarial samples, not a determined attacker with an
interpreter bug: run untrusted models' code in a container or VM as well.

Nothing runs unless the user asked twice, as bigcode-evaluation-harness asks: the config key
`allow_code_execution: true` (`srd eval --allow-code-execution`), checked before any weights
load, and the environment variable SRD_ALLOW_CODE_EXECUTION=1, checked again here before every
program.
"""

from __future__ import annotations

import ast
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

_HARNESS = textwrap.dedent(
    r"""
    def _harness():
        # Everything the verdict depends on is a local of this frame, captured before the program
        # runs; the audit hook below makes frames, the garbage collector and process memory
        # unreachable, so the program can neither read the token nor change what is written.
        import builtins, json, posix, sys
        fd, memory, cpu = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
        payload = json.loads(sys.stdin.read())
        token, tests, entry = payload["token"], payload["tests"], frozenset(payload["entry_points"])
        program, setup = payload["code"], payload["setup"]  # the task's setup builds on the program (MBPP)
        del payload
        write, exit_now, getcwd = posix.write, posix._exit, posix.getcwd
        _exec, _compile = builtins.exec, builtins.compile
        _type, _str, _bytes, _int, _len, _Base, _ImportError = type, str, bytes, int, len, BaseException, ImportError
        root = getcwd()
        readable = tuple(p for p in sys.path if p.startswith("/"))  # the standard library
        readable += ("/dev/null", "/dev/urandom", "/usr/share/zoneinfo")
        writing_flags = posix.O_WRONLY | posix.O_RDWR | posix.O_CREAT | posix.O_TRUNC | posix.O_APPEND | posix.O_EXCL

        import resource
        if memory:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
            resource.setrlimit(resource.RLIMIT_DATA, (memory, memory))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        except (ValueError, OSError):
            pass

        class Denied(PermissionError):
            pass

        class FrameDenied(ValueError):  # the stdlib's optional uses of sys._getframe catch ValueError
            pass

        DENIED = frozenset((
            "os.system", "os.exec", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "subprocess.Popen",
            "os.kill", "os.killpg", "signal.pthread_kill", "os.putenv", "os.unsetenv", "os.symlink", "os.link",
            "os.chown", "os.chflags", "os.lchflags", "shutil.chown", "mmap.__new__", "resource.setrlimit",
            "resource.prlimit", "sys.settrace", "sys.setprofile", "sys._setprofileallthreads",
            "sys._settraceallthreads", "gc.get_objects", "gc.get_referrers", "gc.get_referents",
            "code.__new__", "function.__new__", "sys.remote_exec",
        ))
        FRAMES = frozenset(("sys._getframe", "sys._current_frames", "sys._getframemodulename"))
        HIDDEN = frozenset(("tb_frame", "gi_frame", "cr_frame", "ag_frame", "f_back", "f_locals", "f_globals"))
        # signal handlers receive frames; the others reach memory or processes. A module already
        # loaded cannot be imported afresh either (posix, builtins, sys: what was removed stays removed)
        MODULES = frozenset(("_signal", "signal", "_posixsubprocess", "ctypes", "_ctypes", "mmap", "_testcapi",
                             "_testinternalcapi", "_xxsubinterpreters", "_xxinterpchannels", "multiprocessing",
                             "_multiprocessing", "posix", "_io", "builtins", "sys", "_thread"))
        # event: (the arguments that are paths, the arguments that are directory descriptors)
        PATHS = {"os.remove": ((0,), (1,)), "os.rmdir": ((0,), (1,)), "os.mkdir": ((0,), (2,)),
                 "os.chmod": ((0,), (2,)), "os.utime": ((0,), (3,)), "os.truncate": ((0,), ()),
                 "os.rename": ((0, 1), (2, 3)), "os.chdir": ((0,), ()), "shutil.rmtree": ((0,), (1,)),
                 "shutil.copyfile": ((1,), ()), "shutil.copymode": ((1,), ()), "shutil.copystat": ((1,), ()),
                 "shutil.move": ((1,), ())}

        def normal(path):
            if _type(path) is _bytes:
                path = path.decode("utf-8", "surrogateescape")
            elif _type(path) is not _str:
                return None  # a path-like object could answer differently when the file is opened
            if not path.startswith("/"):
                path = getcwd() + "/" + path
            parts = []
            for part in path.split("/"):
                if part == "..":
                    if parts:
                        parts.pop()
                elif part and part != ".":
                    parts.append(part)
            return "/" + "/".join(parts)

        def inside(path, folder):
            return path == folder or path.startswith(folder + "/")

        class NotAdded(RuntimeError):  # what sys.addaudithook swallows: the program's hook is not added
            pass

        def hook(event, args):
            if event == "sys.addaudithook":
                raise NotAdded()
            if event in DENIED or event.startswith("ctypes.") or event.startswith("socket."):
                raise Denied(event + " is disabled in the srd sandbox")
            if event in FRAMES:
                raise FrameDenied(event + " is disabled in the srd sandbox")
            if event == "open":
                path, mode, flags = args
                if _type(path) is _int:
                    return  # a descriptor the program already holds
                where = normal(path)
                if where is None:
                    raise Denied("the srd sandbox opens only str or bytes paths")
                if inside(where, root):
                    return
                reading = mode is not None and _type(flags) is _int and not flags & writing_flags
                if reading:
                    for folder in readable:
                        if inside(where, folder):
                            return
                raise Denied("opening " + where + " is disabled in the srd sandbox (only its own directory)")
            if event in PATHS:
                paths, descriptors = PATHS[event]
                for i in paths:
                    if _type(args[i]) is _int and event != "os.chdir":
                        continue  # a descriptor the program already holds
                    where = normal(args[i])
                    if where is None or not inside(where, root):
                        raise Denied(event + " outside its directory is disabled in the srd sandbox")
                for i in descriptors:
                    if i < _len(args) and args[i] is not None and args[i] != -1:
                        raise Denied(event + " relative to a descriptor is disabled in the srd sandbox")
            elif event == "import":
                name = "".join((args[0],))  # a plain copy: a str subclass could answer `in` its own way
                if name in MODULES or name.partition(".")[0] in MODULES:
                    raise _ImportError("importing " + name + " is disabled in the srd sandbox")
            elif event == "object.__getattr__" and args[1] in HIDDEN:
                raise Denied("reading " + args[1] + " is disabled in the srd sandbox")
            elif event in ("object.__setattr__", "object.__delattr__") and args[1] in ("__code__", "__class__"):
                raise Denied("replacing " + args[1] + " is disabled in the srd sandbox")

        # calls the audit events do not cover, removed from the modules that hold them (a removed
        # builtin module cannot be imported afresh: the hook refuses it)
        for name in ("mknod", "mkfifo", "chroot", "setuid", "setgid", "seteuid", "setegid", "setreuid",
                     "setregid", "setresuid", "setresgid", "setgroups", "setsid", "setpgid", "setpgrp", "pidfd_open",
                     "sched_setaffinity", "fchdir", "fchown", "fchmod", "lchown"):
            for module in (posix, sys.modules.get("os")):
                if module is not None and hasattr(module, name):
                    delattr(module, name)
        # Comparisons in the tests are made on the values, not by the program's objects: an object
        # whose `==` (or `<`, `in`) always says yes would pass any test. Each side is copied into
        # plain builtins first (the builtin type's own methods read a subclass's value), and a
        # side of a type that is neither builtin nor a container of builtins compares unequal
        # with a builtin one. The tests are rewritten and compiled now, before the program runs.
        import ast

        _tuple, _list, _dict, _set, _frozenset, _float = tuple, list, dict, set, frozenset, float
        _issubclass, _ValueError, _TypeError = issubclass, ValueError, TypeError

        class Unknown(Exception):
            pass

        def canon(x, depth=0):
            t = _type(x)
            if x is None or t is _int or t is _float or t is _str or t is _bytes or t is bool or t is complex:
                return x
            if depth > 100:
                raise Unknown()
            if _issubclass(t, _int):
                return _int.__int__(x)
            if _issubclass(t, _float):
                return _float.__float__(x)
            if _issubclass(t, _str):
                return _str.__str__(x)
            if _issubclass(t, _bytes):
                return _bytes.__bytes__(x)
            if _issubclass(t, _tuple) or _issubclass(t, _list):
                items = []
                for item in (_tuple.__iter__(x) if _issubclass(t, _tuple) else _list.__iter__(x)):
                    items.append(canon(item, depth + 1))
                return ("tuple" if _issubclass(t, _tuple) else "list", _tuple(items))
            if _issubclass(t, _dict):
                pairs = []
                for key, value in _dict.items(x):
                    pairs.append((canon(key, depth + 1), canon(value, depth + 1)))
                return ("dict", _frozenset(pairs))
            if _issubclass(t, _set) or _issubclass(t, _frozenset):
                items = []
                for item in _set.__iter__(x) if _issubclass(t, _set) else _frozenset.__iter__(x):
                    items.append(canon(item, depth + 1))
                return ("set", _frozenset(items))
            raise Unknown()

        def both(a, b):
            try:
                ca = canon(a)
            except Unknown:
                ca = Unknown
            try:
                cb = canon(b)
            except Unknown:
                cb = Unknown
            return ca, cb

        def same(a, b):
            ca, cb = both(a, b)
            if ca is Unknown and cb is Unknown:
                return a == b  # neither side is a value: two of the program's own objects
            if ca is Unknown or cb is Unknown:
                return False
            return ca == cb

        def order(op, a, b):
            ca, cb = both(a, b)
            if ca is Unknown or cb is Unknown:
                return op(a, b) if ca is Unknown and cb is Unknown else False
            return op(ca, cb)

        def contains(a, b):  # a in b
            ca, cb = both(a, b)
            if ca is Unknown and cb is Unknown:
                return a in b
            if ca is Unknown or cb is Unknown:
                return False
            if _type(cb) is _str or _type(cb) is _bytes:
                return _type(ca) is _type(cb) and ca in cb
            if _type(cb) is _tuple and cb[0] == "dict":
                return ca in [k for k, _ in cb[1]]
            if _type(cb) is _tuple:
                return ca in cb[1]
            return False

        import operator

        ORDER = {ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge}

        class ByValue(ast.NodeTransformer):
            def visit_Compare(self, node):
                self.generic_visit(node)
                if len(node.ops) != 1:
                    return node
                op, left, right = node.ops[0], node.left, node.comparators[0]

                def call(name, *args):
                    return ast.Call(func=ast.Name(id=name, ctx=ast.Load()), args=list(args), keywords=[])

                if isinstance(op, (ast.Eq, ast.NotEq)):
                    new = call("__srd_same__", left, right)
                elif isinstance(op, (ast.In, ast.NotIn)):
                    new = call("__srd_in__", left, right)
                elif type(op) in ORDER:
                    new = call("__srd_order__", ast.Constant(value=list(ORDER).index(type(op))), left, right)
                else:
                    return node
                if isinstance(op, (ast.NotEq, ast.NotIn)):
                    new = ast.UnaryOp(op=ast.Not(), operand=new)
                return ast.copy_location(new, node)

        orders = list(ORDER.values())
        helpers = {
            "__srd_same__": same,
            "__srd_in__": contains,
            "__srd_order__": lambda i, a, b: order(orders[i], a, b),
        }
        compiled = []
        for test in tests:
            try:
                tree = ast.fix_missing_locations(ByValue().visit(ast.parse(test)))
                compiled.append(_compile(tree, "<test>", "exec", dont_inherit=True, optimize=0))
            except (SyntaxError, _ValueError, _TypeError):
                compiled.append(None)  # a test that does not parse fails
        del ast, operator

        sys.modules.pop("_signal", None)
        snapshot = dict(vars(builtins))
        sys.addaudithook(hook)
        del hook, resource

        env = {"__name__": "__main__"}
        error = ""
        try:
            _exec(_compile(program, "<candidate>", "exec", dont_inherit=True, optimize=0), env)
            _exec(_compile(setup, "<setup>", "exec", dont_inherit=True, optimize=0), env)
            ran = True
        except _Base as e:
            ran = False
            try:  # joined, so that only a plain str (no subclass with its own "+") reaches the message
                error = "".join((_type(e).__name__, ": ", _str(e)))[:300]
            except _Base:
                error = "the program failed"
        base = {}
        if ran:
            for name, value in env.items():
                if name not in snapshot or name in entry:  # a test's own builtins stay the real ones
                    base[name] = value
        bits = []
        for code in compiled:
            ok = "0"
            if ran and code is not None:
                namespace = dict(base)
                namespace.update(helpers)
                namespace["__builtins__"] = dict(snapshot)
                namespace["__name__"] = "__main__"
                try:
                    _exec(code, namespace)
                    ok = "1"
                except _Base:
                    pass
            bits.append(ok)
        message = token + "\n" + "".join(bits) + "\n" + error
        write(fd, message.encode("utf-8", "replace"))
        exit_now(0)  # nothing the program registered (atexit, finalisers) runs after the verdict

    _harness()
    """
)


ENV_VAR = "SRD_ALLOW_CODE_EXECUTION"


class CodeExecutionRefused(PermissionError):
    """Model-written or data-supplied code would run, and the user has not allowed it."""


def require_code_execution(allowed_by_config: bool, what: str) -> None:
    """Refuse (CodeExecutionRefused, one line with the two switches) unless both the config key
    and the environment variable allow running `what`'s code on this machine."""
    missing = []
    if not allowed_by_config:
        missing.append("allow_code_execution=true (srd eval --allow-code-execution)")
    if os.environ.get(ENV_VAR) != "1":
        missing.append(f"the environment variable {ENV_VAR}=1")
    if missing:
        raise CodeExecutionRefused(
            f"{what} runs model-written programs and the data's own test code on this machine, which srd does only "
            f"when asked: set {' and '.join(missing)}. The sandbox guards against accidents, not attackers "
            "(docs/evaluation.md): run untrusted models' code in a container too"
        )


@dataclass
class TestResult:
    passed: int
    total: int
    status: str  # "ok", "failed", "timeout", "crashed"
    error: str | None = None
    outcomes: list[bool] = field(default_factory=list)

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total


def run_tests(
    code: str,
    tests: Sequence[str],
    *,
    setup: str = "",
    timeout_s: float = 10.0,
    memory_mb: int = 1024,
    entry_points: Iterable[str] = (),
) -> TestResult:
    """Run `code`, then the task's `setup` (which may use the program's names, as MBPP's does), then
    each test (an assert statement) in a sandboxed subprocess; only
    with SRD_ALLOW_CODE_EXECUTION=1 in the environment (CodeExecutionRefused otherwise).

    Each test runs with the real builtins: a name the program defines that shadows a builtin
    (`len`, `set`) is hidden from the tests unless it is one of `entry_points`, the names the
    task asks for (`defined_names` of its reference solution)."""
    require_code_execution(True, "running generated code")
    token = secrets.token_hex(16)  # the harness's verdict carries it; the program cannot read it
    read_fd, write_fd = os.pipe()
    payload = json.dumps(
        {"code": code, "tests": list(tests), "setup": setup, "token": token, "entry_points": sorted(entry_points)}
    )
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="srd-sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "HOME": workdir, "LANG": "C.UTF-8"}
        cpu = max(1, int(timeout_s) + 1)
        # stderr goes to a file in the sandbox (capped by its file-size limit), not to a pipe the
        # evaluator would have to hold in memory
        with open(os.path.join(workdir, ".stderr"), "w+b") as err:
            command = [sys.executable, "-I", "-S", "-B", "-c", _HARNESS, str(write_fd), str(memory_mb << 20), str(cpu)]
            proc = subprocess.Popen(
                [*isolation().prefix, *command],
                stdin=subprocess.PIPE,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd=workdir,
                env=env,
                pass_fds=(write_fd,),
                start_new_session=True,
            )
            os.close(write_fd)
            try:
                proc.communicate(payload.encode(), timeout=timeout_s)
                status = None
            except subprocess.TimeoutExpired:
                status = "timeout"
            finally:
                _kill_session(proc.pid)  # nothing it started may outlive it
            proc.wait(timeout=5)
            raw = _read_until(read_fd, deadline + 1.0, limit=1 << 20)  # a writer left behind cannot block us
            err.seek(max(0, os.fstat(err.fileno()).st_size - 300))
            stderr = err.read()
    if status == "timeout":
        return TestResult(0, len(tests), "timeout", f"exceeded {timeout_s:.0f} s")
    outcomes, error = _verdict(raw, token, len(tests))
    if outcomes is None:  # no verdict from the harness: the program ended it, or wrote its own
        return TestResult(0, len(tests), "crashed", stderr.decode(errors="replace")[-300:] or f"exit {proc.returncode}")
    passed = sum(outcomes)
    return TestResult(passed, len(tests), "ok" if passed == len(tests) else "failed", error or None, outcomes)


def _verdict(raw: str, token: str, n_tests: int) -> tuple[list[bool] | None, str]:
    """The outcomes the harness wrote: the text after the last copy of the run's token (which only
    the harness knows), one 0/1 per test on its own line, then the program's error if any."""
    at = raw.rfind(token + "\n")
    if at < 0:
        return None, ""
    bits, _, error = raw[at + len(token) + 1 :].partition("\n")
    if len(bits) != n_tests or set(bits) - {"0", "1"}:
        return None, ""
    return [b == "1" for b in bits], error[:300]


def defined_names(code: str) -> set[str]:
    """The top-level functions and classes a (reference) program defines, read without running
    it: the names a task's tests call."""
    try:
        tree = ast.parse(code)
    except (SyntaxError, ValueError):
        return set()
    return {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)}


@dataclass(frozen=True)
class Isolation:
    """How the operating system isolates each program, beyond the in-process guard."""

    prefix: tuple[str, ...]  # the command the harness runs under
    network: bool  # a network namespace of its own (no interfaces up: nothing reachable)
    user: bool  # a user namespace: no capabilities outside it (root's included), process limits apply
    description: str


_ISOLATION: Isolation | None = None
_CANDIDATES = (
    (("unshare", "--user", "--map-user=65534", "--net", "--"), True, True, "its own user and network namespaces"),
    (("unshare", "--net", "--"), True, False, "its own network namespace"),
)


def isolation() -> Isolation:
    """The strongest isolation this machine allows, probed once per process: a user namespace in
    which the program is `nobody` with no capabilities outside it, and a network namespace with
    no interface up (Linux `unshare`); without them, the in-process guard alone."""
    global _ISOLATION
    if _ISOLATION is None:
        _ISOLATION = Isolation((), False, False, "no namespace (unshare is not available here)")
        unshare = shutil.which("unshare")
        for prefix, network, user, description in _CANDIDATES if unshare and sys.platform == "linux" else ():
            try:
                probe = subprocess.run(
                    [*prefix, sys.executable, "-I", "-S", "-c", "pass"],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    timeout=20,
                )
            except (OSError, subprocess.SubprocessError):
                continue
            if probe.returncode == 0:
                _ISOLATION = Isolation(prefix, network, user, description)
                break
    return _ISOLATION


def _read_until(fd: int, deadline: float, *, limit: int) -> str:
    """Read the result pipe until its writers close it, the deadline passes or `limit` bytes came:
    a descendant holding the pipe open cannot stall the evaluator, nor flood its memory."""
    import select

    chunks, size = [], 0
    try:
        while size < limit:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                break
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)[:limit].decode(errors="replace")


def _kill_session(sid: int) -> None:
    """SIGKILL the program's process group and every process left in its session (one that moved
    to another group of the session included); none can start a session of its own: the harness
    is the session leader and process creation is refused inside it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(sid, signal.SIGKILL)
    try:
        pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
    except OSError:  # no /proc (not Linux): the process group is all we can reach
        return
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rpartition(b")")[2].split()
            if int(fields[3]) == sid:  # state, ppid, pgrp, session
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile, or not ours to kill


def extract_code(text: str) -> str:
    """The code in a model's answer: the first fenced block if there is one, else the text."""
    if "```" in text:
        parts = text.split("```")
        if len(parts) >= 3:
            block = parts[1]
            first_line, _, rest = block.partition("\n")
            return rest if first_line.strip().lower() in ("python", "py", "python3", "") else block
    return text
