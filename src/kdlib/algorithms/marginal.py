"""``algorithm=marginal``: the teacher's whole next-token distribution carried onto the student's
vocabulary at the start of every byte-aligned group, plus CE.

Each teacher token's probability goes to the student token its text starts with; the configured
divergence (``loss=kl|rkl|jsd|...``) compares that distribution with the student's over its whole
vocabulary; see :mod:`kdlib.xtok.marginal` and docs/cross_tokenizer.md. With identical tokenizers
it is vanilla KD exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig, options_of
from kdlib.xtok.groups import RowKind
from kdlib.xtok.marginal import MarginalLoss, MarginalOptions


@dataclass
class MarginalConfig(CrossTokenizerConfig, MarginalOptions):
    name: str = "marginal"


@register_algorithm("marginal", config=MarginalConfig)
class Marginal(CrossTokenizerAlgorithm):
    row_kind = RowKind.group_starts

    def build_method(self, student_head, match, weights) -> MarginalLoss:
        return MarginalLoss(self.teacher_head, match, self.loss_cfg, options_of(self.cfg, MarginalOptions), **weights)
