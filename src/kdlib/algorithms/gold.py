"""``algorithm=gold``: TRL GOLD's hybrid loss at byte-aligned groups, plus CE.

Chain-rule merged group distributions; the configured divergence (``loss=...``) on the matched
sub-vocabulary plus ULD on the unmatched rest, weighted by the matched fraction unless
``algorithm.matched_weight`` / ``unmatched_weight`` are set; see :mod:`kdlib.xtok.gold` and
docs/cross_tokenizer.md. With identical tokenizers it is vanilla KD exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig, options_of
from kdlib.xtok.gold import GOLDLoss, GOLDOptions
from kdlib.xtok.groups import RowKind


@dataclass
class GOLDConfig(CrossTokenizerConfig, GOLDOptions):
    name: str = "gold"


@register_algorithm("gold", config=GOLDConfig)
class GOLD(CrossTokenizerAlgorithm):
    row_kind = RowKind.group_rows

    def build_method(self, student_head, match, weights) -> GOLDLoss:
        return GOLDLoss(self.teacher_head, match, self.loss_cfg, options_of(self.cfg, GOLDOptions), **weights)
