"""``algorithm=overlap``: KD on the shared sub-vocabulary at 1:1 groups (KDFlow's SimpleCrossTokenizerKD).

Modern tokenizers share most of their common tokens. At every 1:1 group (one student token and one
teacher token over the same bytes, after the same text) both models predict the same piece of text
from the same prefix, so their next-token distributions are comparable on the tokens both
vocabularies contain. With M the matched sub-vocabulary (:mod:`kdlib.xtok.vocab`), s and t the
tempered logits restricted to M (s_M = s[student ids of M], t_M = t[teacher ids of M]):

    KD = sum over 1:1 groups of D(softmax(t_M) || softmax(s_M))

where D is any divergence of kdlib's registry (``loss=kl|rkl|jsd|...``, its temperature and
T^2 option), i.e. both distributions renormalised on M; the CE term is the student's usual
next-token cross-entropy on every loss row. With identical tokenizers every group is 1:1, M is the
whole vocabulary and this is exactly vanilla KD. Unlike KDFlow, tokens are matched by their bytes,
and the unaligned tokens of a truncated side take no part in KD (KDFlow compares them anyway).
This file holds the method whole: its config, its registered algorithm and its per-chunk term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.config.schema import LossConfig
from kdlib.models.head import LMHead
from kdlib.xtok.groups import RowKind
from kdlib.xtok.method import ChunkInputs, CrossTokenizerLoss, divergence, sub_head
from kdlib.xtok.vocab import VocabMatch


@dataclass
class OverlapConfig(CrossTokenizerConfig):
    """``algorithm=overlap``; the divergence is the loss config's (``loss=kl|rkl|jsd|...``)."""

    name: str = "overlap"


class OverlapLoss(CrossTokenizerLoss):
    """KD over the matched sub-vocabulary at 1:1 groups, plus CE."""

    row_kind = RowKind.pairs

    def __init__(self, teacher_head: LMHead, match: VocabMatch, loss: LossConfig, **weights) -> None:
        super().__init__(teacher_head, **weights)
        if match.size == 0:
            raise ValueError("overlap: the two vocabularies share no token")
        device = self.teacher_head.weight.device
        self.match = match.to(device)
        self.loss = loss
        self.matched_teacher_head = sub_head(self.teacher_head, self.match.teacher_ids)
        # Identical vocabularies (M is every row of both heads, in order): no column gather.
        self.identity = bool(
            torch.equal(self.match.student_ids, self.match.teacher_ids)
            and torch.equal(self.match.teacher_ids, torch.arange(self.teacher_head.vocab_size, device=device))
        )

    def kd_sum(self, chunk: ChunkInputs):
        student = chunk.student_logits[chunk.student_start]
        if not self.identity:
            student = student[:, self.match.student_ids]
        elif student.shape[-1] != self.teacher_head.vocab_size:
            raise ValueError(f"overlap: a student head of {student.shape[-1]} rows for an identical "
                             f"vocabulary of {self.teacher_head.vocab_size}")
        head = self.teacher_head if self.identity else self.matched_teacher_head
        teacher = self.teacher_logits(chunk, chunk.teacher_start, head)
        return divergence(self.loss, student, teacher).sum()


@register_algorithm("overlap", config=OverlapConfig)
class Overlap(CrossTokenizerAlgorithm):
    loss_cls = OverlapLoss

    def build_method(self, student_head, match, weights) -> OverlapLoss:
        return OverlapLoss(self.teacher_head, match, self.loss_cfg, **weights)
