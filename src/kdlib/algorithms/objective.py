"""StudentObjective: the student model and its algorithm as one ``nn.Module``.

Every student computation (training loss, held-out sums) goes through this module's ``forward``.
That makes it the natural root for FSDP2: the root gathers the parameters outside the decoder
layers (embeddings, final norm, the head the fused loss reads directly) for the whole computation
and reduces their gradients afterwards, without the algorithm knowing about sharding.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kdlib.algorithms.base import Algorithm
from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.evaluation import HeldoutSums, heldout_sums
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of


class StudentObjective(nn.Module):
    def __init__(
        self, model: nn.Module, algorithm: Algorithm, *, device_type: str, autocast: bool = False, chunk_size: int = 256
    ) -> None:
        super().__init__()
        self.model = model
        self.algorithm = algorithm
        self.device_type = device_type  # where compute runs (parameters may be offloaded)
        self.autocast = autocast
        self.chunk_size = chunk_size

    def forward(
        self,
        batch: MicroBatch,
        teacher: Optional[TeacherOutput],
        normaliser: float,
        weight: float = 1.0,
        evaluate: bool = False,
    ):
        """Training: (loss, kd_sum, ce_sum) tensors, scaled by ``weight`` (0 for padding batches).
        ``evaluate=True``: the held-out sums of the batch (no gradients)."""
        if evaluate:
            return self._evaluate(batch, teacher)
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            terms = self.algorithm.compute_loss(self.model, batch, teacher, normaliser)
        return terms.loss * weight, terms.kd_sum * weight, terms.ce_sum * weight

    def _evaluate(self, batch: MicroBatch, teacher: Optional[TeacherOutput]) -> HeldoutSums:
        with torch.autocast(self.device_type, dtype=torch.bfloat16, enabled=self.autocast):
            hidden = hidden_at_loss_positions(self.model, batch.student)
        teacher_head: Optional[LMHead] = self.algorithm.teacher_head
        return heldout_sums(
            hidden, lm_head_of(self.model), None if teacher is None else teacher.hidden, teacher_head,
            batch.student.targets(), chunk_size=self.chunk_size,
        )

