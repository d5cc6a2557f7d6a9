"""`srd prune`: a depth-pruned student (srd.models.prune), optionally healed by KD from the
teacher on other instruction data (srd.recipes.heal), so that reflection measures a student
that answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from srd.data.sources import load_examples, load_mixture
from srd.models.load import ModelError, check_model_spec, load_model, load_tokenizer
from srd.models.prune import perplexity, perplexity_batches, prune_model
from srd.recipes.heal import HEAL_DATA, heal_student
from srd.utils import atomic_write_json

log = logging.getLogger(__name__)


def check_prune_inputs(
    teacher_spec: str, data: str, data_dir: str | None, num_texts: int, heal_data: Sequence[str] | None
) -> None:
    """Before any weights are read: the teacher exists, the measuring texts and (when healing)
    every healing set parse. `heal_data` None means the default healing sets; () no healing."""
    check_model_spec(teacher_spec)
    load_examples(data, data_dir=data_dir, limit=num_texts)
    if heal_data is None or heal_data:
        load_mixture(list(heal_data or HEAL_DATA), data_dir=data_dir)


def make_student(
    teacher_spec: str,
    n_layers: int,
    out: str,
    *,
    data: str = "dolly-dev",
    num_texts: int = 8,
    max_len: int = 256,
    method: str = "greedy",
    candidates: int = 4,
    keep: Sequence[int] | None = None,
    data_dir: str | None = None,
    batch_size: int = 4,
    heal_steps: int = 0,
    heal_data: Sequence[str] | None = None,
    heal_lr: float = 1e-4,
    heal_batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """`srd prune`: choose layers by measured perplexity, save the student, report.

    With `heal_steps > 0` the pruned student is kept in `<out>/pruned/`, healed by KD from
    the teacher on `heal_data` (see srd.recipes.heal) in `<out>/heal/`, and the healed
    student is saved to `<out>`. The result is cached: a folder whose prune.json records
    the same request is reused, and an interrupted healing run resumes.
    """
    check_prune_inputs(teacher_spec, data, data_dir, num_texts, heal_data if heal_steps > 0 else ())
    prune_kwargs = dict(
        data=data,
        num_texts=num_texts,
        max_len=max_len,
        method=method,
        candidates=candidates,
        keep=keep,
        data_dir=data_dir,
        batch_size=batch_size,
        progress=progress,
    )
    if heal_steps <= 0:
        return prune_model(teacher_spec, n_layers, out, **prune_kwargs)
    out_dir = Path(out)
    heal_data = list(heal_data) if heal_data else list(HEAL_DATA)
    pruned = prune_model(teacher_spec, n_layers, str(out_dir / "pruned"), **prune_kwargs)
    request = {
        **pruned["request"],
        "heal_steps": heal_steps,
        "heal_data": heal_data,
        "heal_lr": heal_lr,
        "heal_batch_size": heal_batch_size,
    }
    report_path = out_dir / "prune.json"
    if report_path.exists():
        report = json.loads(report_path.read_text())
        if report.get("request") == request:
            log.info("reusing the healed student in %s", out_dir)
            return report
        raise ModelError(
            f"{out_dir} holds a student made with other settings ({report.get('request')}); "
            "choose another --out or delete it"
        )
    heal = heal_student(
        teacher_spec,
        out_dir / "pruned",
        out_dir,
        steps=heal_steps,
        data=heal_data,
        lr=heal_lr,
        batch_size=heal_batch_size,
        data_dir=prune_kwargs["data_dir"],
        progress=prune_kwargs["progress"],
    )
    # perplexity of the healed student on the same text the layers were chosen on
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokenizer = load_tokenizer(str(out_dir))
    batches = perplexity_batches(
        tokenizer,
        prune_kwargs["data"],
        prune_kwargs["num_texts"],
        prune_kwargs["max_len"],
        prune_kwargs["data_dir"],
        prune_kwargs["batch_size"],
        device,
    )
    healed_ppl = perplexity(load_model(str(out_dir)).to(device), batches)
    report = {
        **pruned,
        "request": request,
        "pruned_perplexity": pruned["student_perplexity"],
        "student_perplexity": healed_ppl,
        "heal": heal,
    }
    atomic_write_json(report_path, report)
    return report
