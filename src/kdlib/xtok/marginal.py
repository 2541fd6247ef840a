"""``algorithm=marginal``: the teacher's whole next-token distribution, carried onto the student's vocabulary.

At the start of every byte-aligned group both models predict the text after the same prefix, the
teacher as a distribution over its tokens and the student over its own. Each teacher token t
begins with some student token pi(t) (:attr:`kdlib.xtok.vocab.VocabMatch.teacher_prefix`: its
matched student token, else the first token of the student tokenizer's encoding of its text), so
the teacher's probability that the text continues with student token s is, to the extent that
the student spells the continuation starting with pi(t),

    P_T(s) = sum over teacher tokens t with pi(t) = s of P_T(t)

and the KD term is the configured divergence (``loss=kl|rkl|jsd|...``, temperature on the
teacher's logits before the sum and on the student's, T^2 option) between P_T and the student's
distribution at the group's first row, over the **whole** student vocabulary:

    KD = sum over groups of D(P_T || softmax(s))

Unlike ``overlap`` and ``gold``, no teacher probability is dropped because the student cannot
spell the teacher's token in one piece: SmolLM2's ``Ġknowledge`` lends its mass to the demo
tokenizer's ``▁know``. Teacher tokens without a student start (special tokens without a counterpart)
are left out and P_T renormalised; student tokens no teacher token starts with get
``empty_floor`` (so reverse divergences stay finite), then P_T is renormalised. The map is an
approximation where the student's tokenizer merges across a teacher token's end (the student's
``▁it's`` after the teacher's ``Ġit``): on kdlib's demo tokenizer against SmolLM2's, pi(t) is the
student's actual first token at 91.6% of the common token starts of the training responses.
With identical tokenizers pi is the identity and this is exactly vanilla KD. This method is
kdlib's own (it is not in KDFlow or TRL); see docs/cross_tokenizer.md. This file holds the method
whole: its config, its registered algorithm and its per-chunk term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.config.schema import LossConfig
from kdlib.models.head import LMHead
from kdlib.xtok.groups import RowKind
from kdlib.xtok.method import ChunkInputs, CrossTokenizerLoss, divergence
from kdlib.xtok.vocab import VocabMatch


@dataclass
class MarginalConfig(CrossTokenizerConfig):
    """``algorithm=marginal`` and its options (the divergence itself comes from the loss config)."""

    name: str = "marginal"
    # Probability given to a student token that no teacher token starts with, before renormalising.
    empty_floor: float = 1e-12

    def check(self) -> None:
        super().check()
        if not 0.0 < self.empty_floor < 1.0:
            raise ValueError(f"marginal empty_floor must be in (0, 1), got {self.empty_floor}")


class MarginalLoss(CrossTokenizerLoss):
    """The divergence between the teacher's distribution summed onto the student tokens its tokens
    start with and the student's distribution, at the first row of every group, plus CE."""

    row_kind = RowKind.group_starts

    def __init__(
        self, teacher_head: LMHead, match: VocabMatch, loss: LossConfig,
        options: MarginalConfig = MarginalConfig(), **weights,
    ) -> None:
        super().__init__(teacher_head, **weights)
        options.check()
        if match.teacher_prefix is None:
            raise ValueError("marginal: the vocabulary match carries no teacher-to-student prefix map")
        device = self.teacher_head.weight.device
        self.loss = loss
        # The divergence on log-probabilities that are already tempered.
        self.untempered_loss = replace(loss, temperature=1.0, scale_by_temperature_squared=False)
        self.log_floor = math.log(options.empty_floor)
        rows = self.teacher_head.vocab_size
        prefix = torch.full((rows,), -1, dtype=torch.long, device=device)  # head padding rows: -1
        known = min(rows, match.teacher_prefix.shape[0])
        prefix[:known] = match.teacher_prefix[:known].to(device)
        self.identity = bool(torch.equal(prefix, torch.arange(rows, device=device)))
        self.carried = (prefix >= 0).nonzero().squeeze(-1)  # teacher ids with a student start
        if self.carried.numel() == 0:
            raise ValueError("marginal: no teacher token starts with a student token")
        self.target = prefix[self.carried]
        self.student_rows_needed = int(self.target.max()) + 1  # checked against each student head

    def teacher_log_probs(self, teacher_logits: torch.Tensor, student_rows: int) -> torch.Tensor:
        """log P_T [units, student_rows] from tempered teacher logits [units, teacher rows]."""
        if self.identity and student_rows == teacher_logits.shape[-1]:
            return F.log_softmax(teacher_logits, -1)
        if self.student_rows_needed > student_rows:
            raise ValueError(f"marginal: a student head of {student_rows} rows for student token ids up to "
                             f"{self.student_rows_needed - 1}")
        probs = F.softmax(teacher_logits[:, self.carried], -1)
        summed = probs.new_zeros(probs.shape[0], student_rows).index_add_(1, self.target, probs)
        return F.log_softmax(summed.log().clamp_min(self.log_floor), -1)

    def kd_sum(self, chunk: ChunkInputs) -> torch.Tensor:
        temperature = self.loss.temperature
        student = chunk.student_logits[chunk.student_start] / temperature
        teacher_logits = self.teacher_logits(chunk, chunk.teacher_start) / temperature
        teacher = self.teacher_log_probs(teacher_logits, student.shape[-1])
        values = divergence(self.untempered_loss, student, teacher)
        if self.loss.scale_by_temperature_squared:
            values = values * temperature**2
        return values.sum()


@register_algorithm("marginal", config=MarginalConfig)
class Marginal(CrossTokenizerAlgorithm):
    loss_cls = MarginalLoss

    def build_method(self, student_head, match, weights) -> MarginalLoss:
        return MarginalLoss(self.teacher_head, match, self.loss_cfg, self.cfg, **weights)
