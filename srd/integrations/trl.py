"""SRD inside TRL's trainers: the selection and curriculum of `srd.integrations.hf`, and a loss
that takes each stage's tau and alpha.

What each trainer honours (TRL 1.16):

- `SRDGKDTrainer` (TRL's `GKDTrainer` from `trl.experimental.gkd`): the curriculum order
  (with `train_sampling_strategy="sequential"`), tau (the divergence taken at tau and scaled
  by tau^2; TRL's own loss is always at temperature 1, its `temperature` only samples) and
  alpha (alpha CE + (1 - alpha) tau^2 JSD_beta on the batch's labels).
- `transformers.Trainer` (and TRL's `SFTTrainer`, which reads rows with the same sampler): the
  curriculum order only (no teacher: an SFT curriculum); `attach` refuses a tau other than 1
  or an alpha other than 0, which nothing would read.
- TRL's `DistillationTrainer` (on-policy), with `shuffle_dataset=False`: the curriculum order
  and tau, as the temperature its loss reads (without a tau^2 factor; its sampling temperature
  is fixed at construction); `attach` refuses an alpha other than 0 (its loss has no CE term).

`beta` keeps GKD's meaning (0 = forward KL, 1 = reverse KL), `lmbda` its share of on-policy
batches; alpha applies to every batch, so set the curriculum's alphas to 0 (`alpha_start=0,
alpha_end=0`) for GKD's on-policy batches to be pure distillation, as the paper does.

    from srd.integrations.hf import Curriculum, reflect_dataset
    from srd.integrations.trl import SRDGKDTrainer

    reflected = reflect_dataset(ds, student=student, tokenizer=tok, out_dir="runs/gkd-reflection")
    curriculum = Curriculum.from_reflected(reflected, args=args,
                                           curriculum=CurriculumConfig(lr_schedule="global"))
    trainer = SRDGKDTrainer(model=student, teacher_model=teacher, args=args,
                            train_dataset=curriculum.dataset(reflected), processing_class=tok)
    curriculum.attach(trainer)
    trainer.train()

The teacher store (off-policy batches, `lmbda=0`): `use_teacher_store(trainer, top_k=64)` runs the
teacher once over every row the trainer's collator makes, keeps its top-k logits in srd's
teacher store (shared with every later run, seed and `srd` command with the same teacher and k),
and from then on the loss reads them instead of running the teacher: the divergence is taken over
the k tokens plus one bucket for the rest (exact at every stored temperature; `beta` 0, 1 or in
between as above). A later run on the same rows computes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from srd.data.tokenize import Encoded
from srd.losses.kd import kd_loss_sums
from srd.train.loop import STORE_TAUS
from srd.train.teacher_store import TeacherStore, entry_meta, store_root

try:
    from trl.experimental.gkd import GKDTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("srd.integrations.trl needs TRL: pip install 'srd[trl]'") from e


class SRDGKDTrainer(GKDTrainer):
    """GKDTrainer whose loss is alpha * CE + (1 - alpha) * tau^2 * JSD_beta(p_tau, q_tau), with tau
    and alpha from the curriculum callback (`srd_tau`, `srd_alpha`; 1 and 0 without one, which
    is TRL's own loss)."""

    srd_honours = ("tau", "alpha")  # what its loss reads of a curriculum stage (srd.integrations.hf)
    srd_tau: float = 1.0
    srd_alpha: float = 0.0
    srd_stage: int = 0
    srd_teacher_store: TeacherStore | None = None  # set by use_teacher_store

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
        if self.srd_teacher_store is not None:
            return self._stored_teacher_loss(model, inputs, return_outputs, num_items_in_batch)
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        self.teacher_model.eval()
        with torch.no_grad():
            teacher = self.teacher_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        s_logits, t_logits = student.logits[:, :-1, :], teacher.logits[:, :-1, :]
        labels = inputs["labels"][:, 1:]
        tau, alpha = float(self.srd_tau), float(self.srd_alpha)
        loss = (
            (1 - alpha)
            * tau**2
            * self.generalized_jsd_loss(
                student_logits=s_logits,
                teacher_logits=t_logits,
                labels=labels,
                beta=self.beta,
                temperature=tau,
                num_items_in_batch=num_items_in_batch,
            )
        )
        if alpha > 0:
            ce = F.cross_entropy(s_logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
            n = num_items_in_batch if num_items_in_batch is not None else (labels != -100).sum().clamp_min(1)
            loss = loss + alpha * ce / n.to(ce.device) if isinstance(n, torch.Tensor) else loss + alpha * ce / n
        return (loss, student) if return_outputs else loss

    def _stored_teacher_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool, num_items_in_batch: Any):
        """The same loss with the teacher's side read from the store (k + 1 buckets per position)."""
        store = self.srd_teacher_store
        assert store is not None
        student = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"])
        rows = batch_rows(inputs)
        lacking = store.missing(rows, [float(self.srd_tau)])
        if lacking:
            raise ValueError(
                f"{len(lacking)} row(s) of this batch are not in the teacher store {store.folder} at tau "
                f"{self.srd_tau:g} (an on-policy batch, a dataset or collator changed after use_teacher_store, "
                "or a curriculum temperature it was not given): call use_teacher_store again with taus= "
                "every temperature the curriculum uses"
            )
        labels = inputs["labels"][:, 1:]
        mask = labels != -100
        s_logits = student.logits[:, :-1, : int(store.meta["vocab"])][mask]  # the tokenizer's columns, as stored
        tau, alpha = float(self.srd_tau), float(self.srd_alpha)
        teacher = store.rows(rows, s_logits.device, tau)
        divergence, beta = ("fkl", None) if self.beta == 0 else ("rkl", None) if self.beta == 1 else ("jsd", self.beta)
        sums = kd_loss_sums(s_logits, teacher, labels[mask], divergence=divergence, tau=tau, beta=beta)
        n = num_items_in_batch if num_items_in_batch is not None else mask.sum().clamp_min(1)
        n = n.to(sums.kd.device) if isinstance(n, torch.Tensor) else n
        loss = (1 - alpha) * tau**2 * sums.kd / n + alpha * sums.ce / n
        return (loss, student) if return_outputs else loss


def batch_rows(inputs: dict[str, Any]) -> list[Encoded]:
    """Each row of a collated batch without its padding (the positions its attention mask keeps),
    as the teacher store keys it."""
    rows = []
    for ids, att, lab in zip(
        inputs["input_ids"].tolist(), inputs["attention_mask"].tolist(), inputs["labels"].tolist()
    ):
        keep = [i for i, a in enumerate(att) if a]
        rows.append(Encoded(id="", input_ids=[ids[i] for i in keep], labels=[lab[i] for i in keep]))
    return rows


def use_teacher_store(
    trainer: SRDGKDTrainer,
    *,
    top_k: int = 64,
    taus: Sequence[float] | None = None,
    store: str | Path | None = None,
    batch_size: int | None = None,
) -> TeacherStore:
    """Compute the teacher's top-`top_k` logits for every row the trainer's collator makes from its
    training dataset (the rows the store lacks only), into srd's teacher store (`store`: its
    folder; default $SRD_TEACHER_STORE, else <srd cache folder>/teacher-store), at `taus` (default:
    1, 1.5 and 2, SRD's schedule, plus the temperatures of an attached curriculum), and make the
    trainer's loss read them. Off-policy only: refused when `trainer.lmbda > 0` (the student's own
    samples are new rows every step)."""
    if not isinstance(trainer, SRDGKDTrainer):
        raise TypeError(f"use_teacher_store needs an SRDGKDTrainer, got {type(trainer).__name__}")
    if trainer.lmbda > 0:
        raise ValueError(
            f"lmbda={trainer.lmbda}: on-policy batches are the student's own samples, new rows every step, which no "
            "store holds; use the teacher store with lmbda=0 (off-policy), or train without it"
        )
    teacher = trainer.accelerator.unwrap_model(trainer.teacher_model) if hasattr(trainer, "accelerator") else None
    teacher = teacher if teacher is not None else trainer.teacher_model
    tokenizer = trainer.processing_class
    curriculum_taus = [float(t) for t in getattr(trainer, "srd_curriculum_taus", ())]
    wanted = sorted({*(taus if taus is not None else STORE_TAUS), *curriculum_taus, float(trainer.srd_tau)})
    entry = TeacherStore(
        store_root(str(store) if store is not None else None), entry_meta(teacher, len(tokenizer), top_k)
    )
    dataset, collate = trainer.train_dataset, trainer.data_collator
    size = batch_size or trainer.args.per_device_train_batch_size
    rows: list[Encoded] = []
    for start in range(0, len(dataset), size):
        rows += batch_rows(collate([dataset[i] for i in range(start, min(start + size, len(dataset)))]))
    was_training = teacher.training
    teacher.eval()
    entry.build(teacher, tokenizer, rows, wanted)
    entry.note_use(getattr(getattr(teacher, "config", None), "_name_or_path", None))
    teacher.train(was_training)
    trainer.srd_teacher_store = entry
    return entry
