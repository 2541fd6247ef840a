"""Vanilla KD: ``(1 - kd_ratio) * CE + kd_ratio * divergence(teacher || student)`` per token.

The student's and the teacher's logits are recomputed from hidden states by the configured loss
(fused and chunked by default); this is KDFlow's ``vanilla_kd`` and the algorithm of the default run.
With a top-k or sampled teacher signal the divergence is that signal's estimator
(:mod:`kdlib.losses.sparse`) on the same chunked engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from kdlib.algorithms.base import Algorithm, StudentForward, register_algorithm
from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import AlgorithmConfig
from kdlib.losses import LossTerms, distillation_loss
from kdlib.losses.sparse import signal_distillation_loss


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
    signals = ("hidden", "topk", "sampled")

    def loss_of(
        self, fwd: StudentForward, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        if teacher is None:
            raise ValueError("vanilla KD got no teacher output for a micro-batch")
        weights = dict(kd_weight=self.cfg.kd_ratio, ce_weight=1.0 - self.cfg.kd_ratio, normaliser=normaliser)
        if teacher.signal == "hidden":
            if self.teacher_head is None:
                raise ValueError("vanilla KD got teacher hidden states but no teacher head")
            return distillation_loss(fwd.hidden, fwd.head, teacher.hidden, self.teacher_head, fwd.targets,
                                     self.loss_cfg, **weights)
        with torch.autocast(fwd.hidden.device.type, enabled=False):  # the loss is never autocast
            return signal_distillation_loss(fwd.hidden, fwd.head, teacher, fwd.targets, self.loss_cfg, **weights)
