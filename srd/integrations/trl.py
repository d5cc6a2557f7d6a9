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
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

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

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False, num_items_in_batch=None):
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
