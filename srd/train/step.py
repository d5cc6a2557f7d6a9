"""One distillation forward: the student wrapped so the whole loss runs inside forward().

Everything that touches student parameters (body, LM head, chunked loss) happens in
`DistillModule.forward`, so DDP / FSDP wrappers from accelerate see a normal module.
The frozen teacher's hidden states are computed outside and passed in.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from srd.losses.kd import LossSums, kd_loss_sums
from srd.models.features import target_features


class DistillModule(nn.Module):
    """Wraps the student; forward returns the CE and divergence sums of a micro-batch."""

    def __init__(
        self,
        student: nn.Module,
        *,
        divergence: str,
        tau: float,
        beta: float | None,
        chunk_size: int,
        vocab_size: int | None = None,
        recompute: bool = True,
        recompute_log_probs: bool = False,
    ) -> None:
        super().__init__()
        self.student = student
        self.divergence, self.tau, self.beta = divergence, tau, beta
        self.chunk_size, self.vocab_size, self.recompute = chunk_size, vocab_size, recompute
        self.recompute_log_probs = recompute_log_probs

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        teacher_in: Tensor | None = None,
        teacher_head: Any = None,
    ) -> LossSums:
        student_in, targets, _, head = target_features(self.student, input_ids, attention_mask, labels)
        vocab = self.vocab_size

        def s_head(x: Tensor) -> Tensor:
            logits = head(x)
            return logits[..., :vocab] if vocab else logits

        def t_head(x: Tensor) -> Tensor:
            logits = teacher_head(x) if teacher_head is not None else x
            return logits[..., :vocab] if vocab else logits

        return kd_loss_sums(
            student_in,
            teacher_in,
            targets,
            divergence=self.divergence,
            tau=self.tau,
            beta=self.beta,
            chunk_size=self.chunk_size,
            student_head=s_head,
            teacher_head=t_head,
            recompute=self.recompute,
            recompute_log_probs=self.recompute_log_probs,
        )
