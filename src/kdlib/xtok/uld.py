"""``algorithm=uld``: Universal Logit Distillation (Boizard et al. 2024, "Towards cross-tokenizer distillation").

ULD compares the teacher's and the student's next-token distributions without any vocabulary
mapping: each is sorted in decreasing order, the shorter is zero-padded to the longer, and the loss
is the L1 distance between the two sorted vectors (the paper's closed form for its
optimal-transport distance). With p_s = softmax(s / T_s) over the student head's rows and
p_t = softmax(t / T_t) over the teacher's,

    KD = sum over groups of sum_k |sort(p_s)_k - sort(p_t)_k|

at each group's first rows, where both models predict the group's text from the same text prefix.
The paper pairs positions by index after cutting both sequences to the shorter length, which
misaligns them as soon as the tokenisations differ; kdlib pairs them by byte-aligned groups.
``merge_groups`` compares the chain-rule merged group distributions instead
(:mod:`kdlib.xtok.distributions`; TRL's ``use_extended_uld``). The value is invariant to
permuting either vocabulary. TRL: ``uld_student_temperature`` / ``uld_teacher_temperature`` are
``student_temperature`` / ``teacher_temperature``; ``uld_distillation_weight`` and
``uld_crossentropy_weight`` are ``kd_weight`` and ``ce_weight``. The configured loss (``loss=...``)
is not used. This file holds the method whole: its config, its registered algorithm and its
per-chunk term.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.models.head import LMHead
from kdlib.xtok.distributions import group_log_probs, sorted_l1
from kdlib.xtok.groups import RowKind
from kdlib.xtok.method import ChunkInputs, CrossTokenizerLoss


@dataclass
class ULDConfig(CrossTokenizerConfig):
    """``algorithm=uld`` and its options."""

    name: str = "uld"
    # Softmax temperature of the student's distribution (TRL uld_student_temperature).
    student_temperature: float = 1.0
    # Softmax temperature of the teacher's distribution (TRL uld_teacher_temperature).
    teacher_temperature: float = 1.0
    # Compare chain-rule merged group distributions (TRL use_extended_uld) instead of each group's
    # first rows.
    merge_groups: bool = False

    def check(self) -> None:
        super().check()
        if self.student_temperature <= 0 or self.teacher_temperature <= 0:
            raise ValueError("uld temperatures must be > 0")


class ULDLoss(CrossTokenizerLoss):
    """Sorted-probability L1 at aligned groups, plus CE."""

    def __init__(self, teacher_head: LMHead, options: ULDConfig = ULDConfig(), **weights) -> None:
        super().__init__(teacher_head, **weights)
        options.check()
        self.options = options
        self.row_kind = self.row_kind_for(options)

    @classmethod
    def row_kind_for(cls, options: ULDConfig) -> RowKind:
        return RowKind.group_rows if options.merge_groups else RowKind.group_starts

    def kd_sum(self, chunk: ChunkInputs) -> torch.Tensor:
        opts = self.options
        student, _, _ = group_log_probs(
            chunk.student_logits, chunk.student_ids, chunk.student_start, chunk.student_len,
            opts.student_temperature,
        )
        teacher, _, _ = group_log_probs(
            self.teacher_logits(chunk), chunk.teacher_ids, chunk.teacher_start, chunk.teacher_len,
            opts.teacher_temperature,
        )
        return sorted_l1(student.exp(), teacher.exp()).sum()


@register_algorithm("uld", config=ULDConfig)
class ULD(CrossTokenizerAlgorithm):
    loss_cls = ULDLoss

    def build_method(self, student_head, match, weights) -> ULDLoss:
        return ULDLoss(self.teacher_head, self.cfg, **weights)
