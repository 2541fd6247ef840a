"""``algorithm=uld``: Universal Logit Distillation (Boizard et al. 2024) at byte-aligned groups, plus CE.

The L1 distance between both models' sorted next-token distributions, which needs no vocabulary
mapping; see :mod:`kdlib.xtok.uld` and docs/cross_tokenizer.md. ``algorithm.merge_groups=true``
compares chain-rule merged group distributions (TRL's ``use_extended_uld``). The configured loss
(``loss=...``) is not used.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig, options_of
from kdlib.xtok.groups import RowKind
from kdlib.xtok.uld import ULDLoss, ULDOptions


@dataclass
class ULDConfig(CrossTokenizerConfig, ULDOptions):
    name: str = "uld"


@register_algorithm("uld", config=ULDConfig)
class ULD(CrossTokenizerAlgorithm):
    @classmethod
    def teacher_row_kind(cls, cfg) -> RowKind:
        return RowKind.group_rows if cfg.merge_groups else RowKind.group_starts

    def build_method(self, student_head, match, weights) -> ULDLoss:
        return ULDLoss(self.teacher_head, options_of(self.cfg, ULDOptions), **weights)
