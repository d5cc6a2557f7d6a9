"""Where a run executes: the accelerate Accelerator (one process, DDP, or DeepSpeed ZeRO-1/2)
and the training precision it resolves to (`train.precision=auto`)."""

from __future__ import annotations

import logging
import os
from typing import Any

import torch

from srd.config import ConfigError
from srd.models.load import native_bf16

log = logging.getLogger(__name__)


def auto_bf16(cuda: bool) -> bool:
    """train.precision=auto: bf16 autocast where bf16 matmuls run in hardware (a bf16 GPU, or a
    CPU with AVX512-BF16 / AMX, where it was measured faster than float32), float32 elsewhere. SRD_CPU_BF16=0
    keeps CPUs in float32 (the test suite sets it, so its float32 references hold on any CPU)."""
    if cuda:
        return native_bf16("cuda")
    return os.environ.get("SRD_CPU_BF16", "1") != "0" and native_bf16("cpu")


def make_accelerator(precision: str = "auto", sharding: str = "none") -> Any:
    """The run's accelerate Accelerator. `sharding` zero1 / zero2 under a multi-process launcher
    (torchrun) sets up DeepSpeed itself; `accelerate launch` with a DeepSpeed config does that
    through its environment."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    if precision == "bf16" and not cuda and not native_bf16("cpu"):
        log.warning(
            "train.precision=bf16 on a CPU without native bf16 (%s, no AVX512-BF16/AMX): matmuls fall back to a "
            "slow path; fp32 (precision=auto) is several times faster here",
            torch.backends.cpu.get_cpu_capability(),
        )
    if precision == "auto":
        mixed = "bf16" if auto_bf16(cuda) else "no"
    else:
        mixed = "bf16" if precision == "bf16" else "no"
    launched = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"  # accelerate launch + DS config
    if (sharding in ZERO_STAGES or launched) and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return _deepspeed_accelerator(ZERO_STAGES.get(sharding), mixed, cuda)
    return Accelerator(cpu=not cuda, mixed_precision=mixed)


ZERO_STAGES = {"zero1": 1, "zero2": 2}


def _deepspeed_accelerator(stage: int | None, mixed: str, cuda: bool) -> Any:
    """An Accelerator with a DeepSpeed plugin: ZeRO `stage` (train.sharding), or the one
    `accelerate launch` put in the environment (stage None). On CPUs too (gloo), which
    accelerate's cpu=True would silently turn into plain DDP."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs, is_deepspeed_available

    if not is_deepspeed_available():
        what = f"train.sharding=zero{stage}" if stage else "an accelerate DeepSpeed config"
        raise ConfigError(f"{what} needs DeepSpeed: pip install deepspeed (or shard with FSDP: train.sharding=fsdp)")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # what `accelerate launch` sets for a DeepSpeed config
    # batch size, accumulation and clipping are filled in per stage from train.* (_deepspeed_config)
    plugin = DeepSpeedPlugin(zero_stage=stage, gradient_accumulation_steps=1) if stage else None
    backend = "nccl" if cuda else "gloo"
    return Accelerator(
        mixed_precision=mixed, deepspeed_plugin=plugin, kwargs_handlers=[InitProcessGroupKwargs(backend=backend)]
    )


def environment() -> dict[str, Any]:
    """What a run's numbers depend on, beside its config: srd (and the git commit it was imported
    from, where it is a checkout), Python and the libraries, the CPU (its matmul instructions and
    native bf16: recorded times differ several-fold between an AVX2 CPU and an AVX-512-BF16 one),
    the allocator, and the GPUs. `srd env` prints it; every run folder keeps one line of it per
    command started there (environment.jsonl)."""
    import importlib.metadata
    import platform
    from pathlib import Path

    import accelerate
    import transformers

    import srd
    from srd.utils import cpu_allocator_tuned

    info: dict[str, Any] = {"srd": srd.__version__}
    commit = _git_commit(Path(srd.__file__).resolve().parent.parent)
    if commit:
        info["srd_commit"] = commit
    info.update(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        accelerate=accelerate.__version__,
    )
    for optional in ("peft", "trl", "datasets", "deepspeed", "vllm"):  # named only where installed
        try:
            info[optional] = importlib.metadata.version(optional)
        except importlib.metadata.PackageNotFoundError:
            pass
    info.update(cpu=platform.processor() or platform.machine(), cpu_cores=os.cpu_count())
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info.update(
        torch_threads=torch.get_num_threads(),
        cpu_isa=torch.backends.cpu.get_cpu_capability(),
        cpu_native_bf16=native_bf16("cpu"),
        cpu_malloc="tuned" if cpu_allocator_tuned() else "default",  # freed pages reused, or faulted afresh
    )
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        info.update(gpu=names[0], gpus=len(names), cuda=torch.version.cuda)
    return info


def _git_commit(root: Any) -> str | None:
    """The commit of the git checkout srd was imported from (+ '-dirty' with uncommitted changes
    to tracked files), or None where it was installed from a wheel or git is missing."""
    import subprocess

    if not (root / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "diff", "--quiet", "HEAD", "--"], capture_output=True, timeout=10
        ).returncode
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("-dirty" if dirty == 1 else "")


_COMMAND: list[list[str]] = []  # the srd command this process runs (set by the CLI), else sys.argv


def command_started(argv: list[str]) -> None:
    """The command line a run folder records for the command now running (`srd train ...`)."""
    _COMMAND[:] = [list(argv)]


def record_environment(log_file: Any) -> None:
    """Append one line to `log_file` (a run folder's environment.jsonl): when, the command line
    (the srd command, or the Python process's own for the API), and `environment()`. One short
    line written whole, so a resumed run on another machine or with other libraries says so; a
    line a kill tore is skipped by `environments`."""
    import datetime as dt
    import json
    import shlex
    import sys
    from pathlib import Path

    entry = {
        "at": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "argv": shlex.join(_COMMAND[0] if _COMMAND else sys.argv),
        **environment(),
    }
    with Path(log_file).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")


def environments(log_file: Any) -> list[tuple[str, str, int, dict[str, Any]]]:
    """The distinct environments in `log_file`, in order of first use: (first, last, commands
    started, environment), each line's time and command line aside. Unreadable lines are
    skipped."""
    import json
    from pathlib import Path

    seen: dict[str, tuple[str, str, int, dict[str, Any]]] = {}
    try:
        lines = Path(log_file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return []
    for line in lines:
        try:
            entry = json.loads(line)
            at = str(entry.pop("at"))
            entry.pop("argv", None)
            entry.pop("command", None)  # what a benchmark folder's machines.jsonl calls it
        except (ValueError, KeyError, AttributeError, TypeError):
            continue
        key = json.dumps(entry, sort_keys=True)
        first, _, n, _ = seen.get(key, (at, at, 0, entry))
        seen[key] = (first, at, n + 1, entry)
    return list(seen.values())
