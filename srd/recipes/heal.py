"""Healing a depth-pruned student: a short KD phase (forward KL + CE) right after pruning.

Prune-then-distill (Minitron, Sheared-LLaMA): removing a third of SmolLM2's layers leaves a
student that writes `###` lines instead of answers, and reflection over such a student
measures nothing. A few dozen KD steps repair it. Healing uses instruction data that is
NOT the distillation set (GSM8K train, SAMSum, XSum by default), so that reflection still
measures the student's compatibility with Dolly rather than what it memorised.

The healing run is an ordinary one-stage `train_stage` run in `<out>/heal/` (resumable,
logs, TensorBoard); its final weights are exported to `<out>` itself and the numbers
(perplexity before and after on the pruning text, wall time) are added to `prune.json`.
"""

from __future__ import annotations

import logging
import math
import shutil
from pathlib import Path
from typing import Any

from srd.config import PruneConfig, RunConfig, from_dict
from srd.data.sources import load_mixture
from srd.recipes.train import load_models, prepare_run_dir
from srd.rundir import RunDir
from srd.runtime import make_accelerator
from srd.train.loop import train_stage
from srd.utils import TMP_TAG, folder_locks, replace_dir

log = logging.getLogger(__name__)

HEAL_DATA = tuple(PruneConfig().heal_data)  # the healing sets by default (the prune section)


def heal_config(
    teacher: str,
    pruned: Path,
    out: Path,
    *,
    steps: int,
    data: list[str],
    lr: float,
    batch_size: int,
    grad_accum: int,
    max_len: int,
    data_dir: str | None,
    seed: int,
) -> Any:
    """The RunConfig of the healing run: each heal example is seen about once."""

    per_set = math.ceil(steps * batch_size * grad_accum / len(data))
    return from_dict(
        RunConfig,
        {
            "name": "heal",
            "output_dir": str(out),
            "seed": seed,
            "method": "baseline",
            "model": {"teacher": teacher, "student": str(pruned)},
            "data": {
                "train": list(data),
                "dev": None,
                "train_limit": per_set,
                "data_dir": data_dir,
                "max_prompt_len": max_len * 3 // 4,
                "max_len": max_len,
            },
            "loss": {"divergence": "fkl", "alpha": 0.5, "tau": 1.0},
            "train": {
                "max_steps": steps,
                "batch_size": batch_size,
                "grad_accum": grad_accum,
                "lr": lr,
                "warmup_steps": max(1, steps // 20),
                "save_every": 10,
                "keep_last": 1,
            },
            "dev_eval": {"num_examples": 0},
        },
    )


@folder_locks()  # the run folder is this process's until it returns
def heal_student(
    teacher: str,
    pruned: Path,
    out: Path,
    *,
    steps: int,
    data: list[str] | None = None,
    lr: float = 1e-4,
    batch_size: int = 8,
    grad_accum: int = 1,
    max_len: int = 256,
    data_dir: str | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Heal the student in `pruned` by KD from `teacher`; export the result to `out`."""

    cfg = heal_config(
        teacher,
        pruned,
        out,
        steps=steps,
        data=list(data or HEAL_DATA),
        lr=lr,
        batch_size=batch_size,
        grad_accum=grad_accum,
        max_len=max_len,
        data_dir=data_dir,
        seed=seed,
    )
    acc = make_accelerator(cfg.train.precision, cfg.train.sharding)
    run_dir = prepare_run_dir(cfg)
    student, teacher_model, tokenizer = load_models(cfg, need_teacher=True)
    train = load_mixture(cfg.data.train, data_dir=cfg.data.data_dir, limit=cfg.data.train_limit)
    log.info("healing on %d examples from %s for %d steps", len(train), cfg.data.train, steps)
    summary = train_stage(
        cfg,
        student=student,
        teacher=teacher_model,
        tokenizer=tokenizer,
        train_examples=train,
        out_dir=run_dir,
        accelerator=acc,
        progress=progress,
        desc="healing",
    )
    if not summary["complete"]:
        raise RuntimeError(f"healing stopped at step {summary['steps']}; rerun the same command to resume")
    # export <out>/heal/final -> <out> (model files only; prune.json is written by the caller)
    tmp = out / f".healed{TMP_TAG}"
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(RunDir(run_dir).as_stage.final, tmp)
    for f in tmp.iterdir():
        target = out / f.name
        if target.is_dir():
            replace_dir(f, target)
        else:
            f.replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    return {
        "steps": summary["steps"],
        "examples": len(train),
        "data": cfg.data.train,
        "lr": lr,
        "batch": f"{batch_size} x {grad_accum} x {max_len} tokens",
        "loss": "0.5 * CE + 0.5 * forward KL (tau 1)",
        "wall_time_s": summary["wall_time_s"],
        "run_dir": str(run_dir),
    }
