"""Vanilla KD: ``(1 - kd_ratio) * CE + kd_ratio * divergence(teacher || student)`` per token.

The student's and the teacher's logits are recomputed from hidden states by the configured loss
(fused and chunked by default); this is KDFlow's ``vanilla_kd`` and the algorithm of the default run.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from kdlib.algorithms.base import Algorithm, register_algorithm
from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import AlgorithmConfig
from kdlib.losses import LossTerms, distillation_loss


@dataclass
class VanillaKDConfig(AlgorithmConfig):
    name: str = "vanilla"
    # Weight of the KD term; the CE term on the dataset's tokens gets 1 - kd_ratio.
    kd_ratio: float = 0.5

    def check(self) -> None:
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")


@register_algorithm("vanilla", config=VanillaKDConfig)
class VanillaKD(Algorithm):
    cfg: VanillaKDConfig

    def compute_loss(
        self, student: nn.Module, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        if teacher is None:
            raise ValueError("vanilla KD got no teacher output for a micro-batch")
        fwd = self.student_forward(student, batch)
        return distillation_loss(
            fwd.hidden, fwd.head, teacher.hidden, self.teacher_head, fwd.targets, self.loss_cfg,
            kd_weight=self.cfg.kd_ratio, ce_weight=1.0 - self.cfg.kd_ratio, normaliser=normaliser,
        )
