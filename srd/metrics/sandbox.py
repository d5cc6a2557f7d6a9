"""Run generated code against assert-style tests in a sandboxed subprocess (MBPP pass@1).

Defences, in the spirit of the reliability guard of OpenAI's human-eval harness:
  * a separate Python process in its own session, killed (whole process group) at the
    wall-clock limit; CPU-time, address-space, file-size and (non-root) process limits;
  * a fresh temporary working directory, deleted afterwards; `open` refuses to write
    anywhere else; file deletion/renaming/permission functions are disabled;
  * process creation (fork, exec, spawn, system, subprocess, multiprocessing) and
    signalling are disabled, so a fork bomb cannot start;
  * sockets are disabled (no network), as are `ctypes` loading and interpreter exits.
This stops accidents and careless code, not a determined attacker: run untrusted models'
code in a container or VM as well.

Nothing runs unless the user asked twice, as bigcode-evaluation-harness asks: the config key
`allow_code_execution: true` (`srd eval --allow-code-execution`), checked before any weights
load, and the environment variable SRD_ALLOW_CODE_EXECUTION=1, checked again here before every
program.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

_HARNESS = textwrap.dedent(
    r"""
    import builtins, io, json, os, sys
    RESULT_FD = int(sys.argv[1]); MEMORY = int(sys.argv[2]); CPU = int(sys.argv[3])
    payload = json.loads(sys.stdin.read())
    result = os.fdopen(RESULT_FD, "w")
    root = os.path.realpath(os.getcwd())

    def _guard():
        import resource, shutil, socket, subprocess
        if MEMORY:
            resource.setrlimit(resource.RLIMIT_AS, (MEMORY, MEMORY))
            resource.setrlimit(resource.RLIMIT_DATA, (MEMORY, MEMORY))
        resource.setrlimit(resource.RLIMIT_CPU, (CPU, CPU))
        resource.setrlimit(resource.RLIMIT_FSIZE, (10 << 20, 10 << 20))
        try:
            resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
        except (ValueError, OSError):
            pass
        def denied(*a, **k):
            raise PermissionError("disabled in the srd sandbox")
        for name in ("fork", "forkpty", "system", "popen", "kill", "killpg", "execv", "execve", "execl", "execle",
                     "execlp", "execlpe", "execvp", "execvpe", "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv",
                     "spawnve", "spawnvp", "spawnvpe", "posix_spawn", "posix_spawnp", "remove", "unlink", "rmdir",
                     "removedirs", "rename", "renames", "replace", "truncate", "ftruncate", "chmod", "fchmod",
                     "chown", "fchown", "lchown", "link", "symlink", "setuid", "setgid", "putenv", "unsetenv",
                     "chroot", "fchdir", "chdir", "nice", "plock", "setsid", "register_at_fork"):
            if hasattr(os, name):
                setattr(os, name, denied)
        for name in ("rmtree", "move", "chown", "copy", "copy2", "copyfile", "copytree"):
            setattr(shutil, name, denied)
        subprocess.Popen = denied
        subprocess.run = subprocess.call = subprocess.check_output = subprocess.check_call = denied
        socket.socket = denied
        socket.create_connection = denied
        socket.socketpair = denied
        real_open = builtins.open
        def guarded_open(file, mode="r", *args, **kwargs):
            if isinstance(file, int):
                raise PermissionError("opening file descriptors is disabled in the srd sandbox")
            if any(c in mode for c in "wax+"):
                path = os.path.realpath(os.fspath(file))
                if not (path == root or path.startswith(root + os.sep)):
                    raise PermissionError(f"writing outside the sandbox directory is disabled: {path}")
            return real_open(file, mode, *args, **kwargs)
        builtins.open = guarded_open
        io.open = guarded_open
        os.open = denied
        builtins.exit = builtins.quit = denied
        sys.modules["ctypes"] = None
        sys.modules["_ctypes"] = None
        sys.modules["multiprocessing"] = None
        sys.modules["resource"] = None

    _guard()
    outcomes = []
    env = {"__name__": "__main__"}
    try:
        exec(compile(payload["setup"] + "\n" + payload["code"], "<candidate>", "exec"), env)
        ok_program = True
        error = None
    except BaseException as e:
        ok_program = False
        error = f"{type(e).__name__}: {e}"[:300]
    for test in payload["tests"]:
        if not ok_program:
            outcomes.append(False)
            continue
        try:
            exec(compile(test, "<test>", "exec"), env)
            outcomes.append(True)
        except BaseException:
            outcomes.append(False)
    result.write(json.dumps({"outcomes": outcomes, "error": error}))
    result.flush()
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
    code: str, tests: Sequence[str], *, setup: str = "", timeout_s: float = 10.0, memory_mb: int = 1024
) -> TestResult:
    """Run `setup + code`, then each test (an assert statement) in a sandboxed subprocess; only
    with SRD_ALLOW_CODE_EXECUTION=1 in the environment (CodeExecutionRefused otherwise)."""
    require_code_execution(True, "running generated code")
    read_fd, write_fd = os.pipe()
    payload = json.dumps({"code": code, "tests": list(tests), "setup": setup})
    deadline = time.monotonic() + timeout_s
    with tempfile.TemporaryDirectory(prefix="srd-sandbox-") as workdir:
        env = {"PATH": "/usr/bin:/bin", "PYTHONHASHSEED": "0", "PYTHONDONTWRITEBYTECODE": "1", "HOME": workdir}
        cpu = max(1, int(timeout_s) + 1)
        # stderr goes to a file in the sandbox (capped by its file-size limit), not to a pipe the
        # evaluator would have to hold in memory
        with open(os.path.join(workdir, ".stderr"), "w+b") as err:
            proc = subprocess.Popen(
                [sys.executable, "-I", "-S", "-c", _HARNESS, str(write_fd), str(memory_mb << 20), str(cpu)],
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
                _kill_group(proc)  # nothing it started may outlive it
            proc.wait(timeout=5)
            raw = _read_until(read_fd, deadline + 1.0, limit=1 << 20)  # a writer left behind cannot block us
            err.seek(max(0, os.fstat(err.fileno()).st_size - 300))
            stderr = err.read()
    if status == "timeout":
        return TestResult(0, len(tests), "timeout", f"exceeded {timeout_s:.0f} s")
    try:
        data = json.loads(raw)
        outcomes = data["outcomes"]
        if not (
            isinstance(outcomes, list) and len(outcomes) == len(tests) and all(x in (True, False) for x in outcomes)
        ):
            raise ValueError("malformed outcomes")
    except (ValueError, TypeError, KeyError):  # no result, or not one the harness writes
        return TestResult(0, len(tests), "crashed", stderr.decode(errors="replace")[-300:] or f"exit {proc.returncode}")
    passed = sum(outcomes)
    return TestResult(passed, len(tests), "ok" if passed == len(tests) else "failed", data.get("error"), outcomes)


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


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def extract_code(text: str) -> str:
    """The code in a model's answer: the first fenced block if there is one, else the text."""
    if "```" in text:
        parts = text.split("```")
        if len(parts) >= 3:
            block = parts[1]
            first_line, _, rest = block.partition("\n")
            return rest if first_line.strip().lower() in ("python", "py", "python3", "") else block
    return text
