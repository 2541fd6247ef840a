"""``algorithm=overlap``: KD on the shared sub-vocabulary at 1:1 groups, plus CE (KDFlow's CTKD).

The divergence is the configured loss (``loss=kl|rkl|jsd|...``) over the tokens both vocabularies
spell alike, renormalised; see :mod:`kdlib.xtok.overlap` and docs/cross_tokenizer.md. With
identical tokenizers it is vanilla KD exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.xtok.groups import RowKind
from kdlib.xtok.overlap import OverlapLoss


@dataclass
class OverlapConfig(CrossTokenizerConfig):
    name: str = "overlap"


@register_algorithm("overlap", config=OverlapConfig)
class Overlap(CrossTokenizerAlgorithm):
    row_kind = RowKind.pairs

    def build_method(self, student_head, match, weights) -> OverlapLoss:
        return OverlapLoss(self.teacher_head, match, self.loss_cfg, **weights)
