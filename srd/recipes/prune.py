"""`srd prune`: a depth-pruned student (srd.models.prune), optionally healed by KD from the
teacher on other instruction data (srd.recipes.heal), so that reflection measures a student
that answers."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from srd.config import ConfigError, PruneConfig
from srd.data.sources import load_examples, load_mixture
from srd.models.load import ModelError, check_model_spec, load_model, load_tokenizer
from srd.models.prune import (
    PERPLEXITY_BATCH_SIZE,
    check_layer_request,
    perplexity,
    perplexity_batches,
    prune_model,
)
from srd.recipes.heal import heal_student
from srd.utils import atomic_write_json, claim_folder, mark_srd_folder, read_json

log = logging.getLogger(__name__)


def make_student(
    teacher_spec: str,
    out: str,
    prune: PruneConfig,
    *,
    data_dir: str | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`srd prune`: choose prune.layers of the teacher's layers by measured perplexity (or take
    prune.keep), save the student to `out`, report.

    With prune.heal_steps > 0 the pruned student is kept in `<out>/pruned/`, healed by KD from
    the teacher on prune.heal_data (see srd.recipes.heal) in `<out>/heal/`, and the healed
    student is saved to `<out>`. The result is cached: a folder whose prune.json records the
    same request is reused, and an interrupted healing run resumes. An existing non-empty `out`
    that srd did not write is refused before any weights load, unless `overwrite`.
    """
    if prune.layers is None and not prune.keep:
        raise ConfigError("srd prune needs the number of layers to keep: prune.layers=N (--layers N) or prune.keep")
    claim_folder(
        Path(out),
        "student",
        overwrite=overwrite,
        legacy=(Path(out) / "prune.json").is_file(),
        how="--overwrite",
        replaces=prune.heal_steps <= 0,
        create=False,  # marked below, once the teacher, the layers and the data passed their checks
    )
    if prune.heal_steps > 0:  # before any weights (prune_model checks the teacher and its texts)
        load_mixture(list(prune.heal_data), data_dir=data_dir)
    check_model_spec(teacher_spec)
    check_layer_request(teacher_spec, prune.layers or len(prune.keep or []), prune.keep)
    load_examples(prune.data, data_dir=data_dir, limit=prune.num_texts)
    mark_srd_folder(Path(out), "student")
    measure = dict(data=prune.data, num_texts=prune.num_texts, max_len=prune.max_len, data_dir=data_dir)
    search = dict(method=prune.method, candidates=prune.candidates, keep=prune.keep, progress=progress)
    n_layers = prune.layers or len(prune.keep or [])
    if prune.heal_steps <= 0:
        report = prune_model(teacher_spec, n_layers, out, **measure, **search)
        mark_srd_folder(Path(out), "student")  # the saved model folder replaced the marked one
        return report
    out_dir = Path(out)
    pruned = prune_model(teacher_spec, n_layers, str(out_dir / "pruned"), **measure, **search)
    request = {
        **pruned["request"],
        "heal_steps": prune.heal_steps,
        "heal_data": list(prune.heal_data),
        "heal_lr": prune.heal_lr,
        "heal_batch_size": prune.heal_batch_size,
    }
    report_path = out_dir / "prune.json"
    if report_path.exists():
        report = read_json(report_path)
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
        steps=prune.heal_steps,
        data=list(prune.heal_data),
        lr=prune.heal_lr,
        batch_size=prune.heal_batch_size,
        data_dir=data_dir,
        progress=progress,
    )
    # perplexity of the healed student on the same text the layers were chosen on
    device = "cuda" if torch.cuda.is_available() else "cpu"
    texts = load_examples(prune.data, data_dir=data_dir, limit=prune.num_texts)
    batches = perplexity_batches(load_tokenizer(str(out_dir)), texts, prune.max_len, PERPLEXITY_BATCH_SIZE, device)
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
