"""Supervised fine-tuning (black-box KD): cross-entropy on the dataset's responses, no teacher.

Paired with ``+recipe=generate`` this is sequence-level KD (Kim and Rush, 2016): the teacher writes
the responses once, the student imitates them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


from kdlib.algorithms.base import Algorithm, StudentForward, register_algorithm
from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import AlgorithmConfig
from kdlib.losses import LossTerms, distillation_loss


@dataclass
class SFTConfig(AlgorithmConfig):
    name: str = "sft"


@register_algorithm("sft", config=SFTConfig)
class SFT(Algorithm):
    needs_teacher = False
    signals = ("hidden", "topk", "sampled")  # reads no teacher at all

    def loss_of(
        self, fwd: StudentForward, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        return distillation_loss(
            fwd.hidden, fwd.head, None, None, fwd.targets, self.loss_cfg,
            kd_weight=0.0, ce_weight=1.0, normaliser=normaliser,
        )
