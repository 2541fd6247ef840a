"""``algorithm=dskd``: Dual-Space KD (Zhang et al. 2024) with exact token alignment, plus CE.

Two projectors between the hidden spaces, initialised by pseudo-inverses on the matched
sub-vocabulary (so that with identical vocabularies the projected logits are the originals), are
trainable modules of the algorithm: the student worker puts them in its optimizer (learning rate
``algorithm.projector_lr``, KDFlow's ``--dskd_projector_lr``; null = train.lr), saves and restores
them with its training checkpoints, and leaves them out of the exported student. See
:mod:`kdlib.xtok.dskd` and docs/cross_tokenizer.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import nn

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig, options_of
from kdlib.xtok.dskd import DSKDLoss, DSKDOptions, DSKDProjectors
from kdlib.xtok.groups import RowKind


@dataclass
class DSKDConfig(CrossTokenizerConfig, DSKDOptions):
    name: str = "dskd"
    # Learning rate of the two projectors (KDFlow's --dskd_projector_lr); null = train.lr. They
    # follow the run's warmup and cosine schedule like the student's parameters.
    projector_lr: Optional[float] = None

    def check(self) -> None:
        super().check()
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ValueError(f"projector_lr must be positive or null, got {self.projector_lr}")


@register_algorithm("dskd", config=DSKDConfig)
class DSKD(CrossTokenizerAlgorithm):
    cfg: DSKDConfig

    row_kind = RowKind.pairs

    def build_method(self, student_head, match, weights) -> DSKDLoss:
        self.projectors = DSKDProjectors.from_heads(student_head, self.teacher_head, match)
        return DSKDLoss(self.teacher_head, self.projectors, self.loss_cfg, options_of(self.cfg, DSKDOptions),
                        match=match, **weights)

    def modules(self) -> dict[str, nn.Module]:
        return {"dskd_projectors": self.projectors} if self.method is not None else {}

    def modules_lr(self) -> Optional[float]:
        return self.cfg.projector_lr
