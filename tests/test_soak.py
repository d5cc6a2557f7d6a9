"""Soak test: `srd run` killed with SIGKILL at random moments of every phase, rerun with the same
command each time, must end exactly where an uninterrupted run ends: the same manifest, the same
final weights (float32 CPU: bit-identical), the same scores, and no temporary file left behind.

Three variants: float32 in one process; bf16 throughout with dev ROUGE-L during training and
the checkpoint it chooses (eval.checkpoint=best, its best/ weights compared too), on models as
wide as SmolLM2-135M; and two processes (torchrun, gloo). Each kill lands at a random moment of
its phase's length in the uninterrupted run. CI runs 10 kills per variant (SRD_SOAK_KILLS); a
longer soak by hand:
    SRD_SOAK_KILLS=60 SRD_SOAK_SEED=7 python -m pytest -q tests/test_soak.py
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from srd.utils import MARKER
from tests.test_srd_run import (
    _args,
    srd_data,  # noqa: F401 (a fixture)
)

ROOT = Path(__file__).resolve().parents[1]

# (phase, "in progress" test on the run folder), in the order a run goes through them
PHASES = [
    (
        "reflection",
        lambda r: (r / "reflection" / "meta.json").exists() and not (r / "reflection" / "summary.json").exists(),
    ),
    (
        "teacher store",  # between the reflection and the first stage's loop: the store's rows are built
        lambda r: (r / "reflection" / "summary.json").exists() and not (r / "stages" / "stage-1" / "logs").exists(),
    ),
    *[
        (
            f"stage {i}",
            lambda r, i=i: (
                (r / "stages" / f"stage-{i}" / "logs").exists()
                and not (r / "stages" / f"stage-{i}" / "done.json").exists()
            ),
        )
        for i in (1, 2, 3)
    ],
    ("KD baseline", lambda r: (r / "baseline" / "stages").exists() and not (r / "baseline" / "results.json").exists()),
    ("evaluation", lambda r: (r / "baseline" / "results.json").exists() and not (r / "experiment.json").exists()),
    ("report", lambda r: (r / "experiment.json").exists() and not (r / "report.md").exists()),
]


# what users run, beyond the float32 single-process default: bf16 throughout (training under
# autocast, reflection and dev decoding in bf16 weights, evaluation in bf16) with dev ROUGE-L
# during training and the checkpoint it chooses; and two processes (gloo)
VARIANTS = {
    "fp32": [],
    "bf16-best": [
        "train.precision=bf16",
        "generation.dtype=bfloat16",
        "eval.dtype=bfloat16",
        "train.eval_every=1",
        "dev_eval.num_examples=4",
        "dev_eval.max_new_tokens=4",
        "eval.checkpoint=best",
        # batches of several rows: an answer in bf16 can depend on the rows decoded beside it
        "generation.batch_size=3",
        "reflect.batch_size=3",
        "eval.batch_size=3",
    ],
    "two-processes": [],
}


def _command(tiny_models, data, out: Path, variant: str = "fp32") -> list[str]:
    extra = [
        "loss.teacher_top_k=4",
        f"loss.teacher_store={out / 'store'}",  # its own: the soak run builds its rows, under kills
        "train.save_every=1",
        "train.precision=fp32",
        "compare.baseline=true",
        f"eval.benchmarks=[{data['dev']}]",
        "eval.models=[teacher, initial, baseline, final]",
        "eval.greedy=true",
        "eval.max_new_tokens=4",
        "eval.batch_size=2",
        *VARIANTS[variant],
    ]
    args = _args("run", tiny_models, data, out, *extra)
    if variant == "two-processes":
        port = str(29600 + os.getpid() % 300)
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                "-m", "srd.cli", *args]  # fmt: skip
    return [sys.executable, "-m", "srd.cli", *args]


def _start(cmd: list[str]) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True
    )


def _kill_during(
    cmd: list[str], run: Path, phase: str, rng: random.Random, lasts: float, timeout: float = 300
) -> str | None:
    """Start the run, wait until `phase` is in progress, SIGKILL it at a random moment of the
    phase's length in an uninterrupted run (`lasts` seconds), so that kills land anywhere in it,
    not only at its start. Returns the phase the run was in when killed (None: it finished first)."""
    check = dict(PHASES)[phase]
    proc = _start(cmd)
    t0 = time.monotonic()
    while proc.poll() is None and not check(run) and time.monotonic() - t0 < timeout:
        time.sleep(0.005)
    if proc.poll() is None:
        time.sleep(rng.uniform(0.0, lasts))
    if proc.poll() is not None:
        assert proc.returncode == 0, proc.stderr.read()
        return None
    where = next((name for name, test in PHASES if test(run)), "between phases")
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every worker at once
    proc.wait()
    return where


def _finish(cmd: list[str]) -> None:
    proc = _start(cmd)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err


def _timed_finish(cmd: list[str], run: Path) -> dict[str, float]:
    """Run to the end; how many seconds each phase was in progress (watched every 5 ms)."""
    proc = _start(cmd)
    lasts = {name: 0.0 for name, _ in PHASES}
    last = time.monotonic()
    while proc.poll() is None:
        time.sleep(0.005)
        now = time.monotonic()
        where = next((name for name, test in PHASES if test(run)), None)
        if where is not None:
            lasts[where] += now - last
        last = now
    assert proc.returncode == 0, proc.stderr.read()
    return lasts


def _weights(run: Path) -> dict[str, bytes]:
    """Every final and dev-chosen (best/) model of the run."""
    found = sorted([*run.rglob("final/model.safetensors"), *run.rglob("best/model.safetensors")])
    return {str(p.relative_to(run)): p.read_bytes() for p in found}


def _log_rows(path: Path) -> list[tuple]:
    """(step, values but times) of every row of a train.jsonl / eval.jsonl."""
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    skip = ("elapsed_s", "tokens_per_s")
    return [tuple(sorted((k, v) for k, v in r.items() if k not in skip)) for r in rows]


def _scores(run: Path) -> dict[str, str]:
    return {str(p.relative_to(run)): p.read_text() for p in sorted(run.rglob("eval/greedy/*/*.jsonl"))}


@pytest.mark.soak
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_random_sigkills_end_where_an_uninterrupted_run_ends(
    tmp_path,
    tiny_models,
    wide_models,
    srd_data,  # noqa: F811
    variant,
):
    if variant == "bf16-best":
        tiny_models = {**tiny_models, **wide_models}  # wide enough for bf16 to depend on the batch
    kills = int(os.environ.get("SRD_SOAK_KILLS", "10"))
    rng = random.Random(int(os.environ.get("SRD_SOAK_SEED", "0")))
    ref_cmd = _command(tiny_models, srd_data, tmp_path / "ref", variant)
    cmd = _command(tiny_models, srd_data, tmp_path / "soak", variant)
    ref, run = tmp_path / "ref" / "x", tmp_path / "soak" / "x"
    lasts = _timed_finish(ref_cmd, ref)
    killed_in: list[str] = []
    names = [name for name, _ in PHASES]
    attempt = 0
    # phases in run order, each at least once, then random ones, until `kills` kills and every
    # phase was hit (a finished run is compared and started over)
    while (len(killed_in) < kills or set(names) - set(killed_in)) and attempt < 20 * kills:
        missing = [n for n in names if n not in killed_in]
        phase = names[attempt] if attempt < len(names) else (missing[0] if missing else rng.choice(names))
        attempt += 1
        if (run / "report.md").exists():
            import shutil

            _compare(ref, run)
            shutil.rmtree(tmp_path / "soak")
        where = _kill_during(cmd, run, phase, rng, lasts[phase])
        if where is not None:
            killed_in.append(where)
    _finish(cmd)
    _compare(ref, run)
    assert len(killed_in) >= kills and set(names) <= set(killed_in), str(killed_in)


def _compare(ref: Path, run: Path) -> None:
    manifest = "reflection/manifest.jsonl"
    assert (run / manifest).read_text() == (ref / manifest).read_text()
    a, b = _weights(ref), _weights(run)
    assert list(a) == list(b) and a == b  # every stage's and the baseline's final weights, bit for bit
    assert _scores(run) == _scores(ref)  # every evaluated model's per-example answers and scores
    for log in sorted(ref.rglob("logs/*.jsonl")):  # every step and evaluation logged once, same values
        mine = run / log.relative_to(ref)
        assert _log_rows(mine) == _log_rows(log), mine
    assert (run / "report.md").exists() and (run / "comparison.md").exists()
    stray = [p for p in run.rglob("*") if (p.name.startswith(".") and p.name != MARKER) or "srd-tmp" in p.name]
    assert not stray, stray
