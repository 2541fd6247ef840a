"""What the cross-tokenizer algorithms share: their config base, the method, the teacher rows.

``overlap``, ``uld``, ``gold``, ``dskd`` and ``marginal`` are algorithms like ``vanilla``: the
student's own forward to the hidden states at all its loss rows, then a loss. Each lives in one file
of :mod:`kdlib.xtok` (its config, a subclass of :class:`CrossTokenizerConfig` whose fields are the
method's options, its registered algorithm and its per-chunk term). Their loss is a
:class:`~kdlib.xtok.method.CrossTokenizerLoss` (chunked, never a full ``[tokens, vocab]`` tensor)
built once the student exists (:meth:`CrossTokenizerAlgorithm.attach`: the matched vocabulary of
the two tokenizers, the student head for DSKD's projectors) and called per micro-batch with the
micro-batch's byte-offset groups and the teacher hidden states at the rows the method reads
(:meth:`CrossTokenizerAlgorithm.teacher_row_kind`; the teacher sends only those, or every loss
row when its output comes from a teacher cache, and then they are picked here). With identical
tokenizers every group is 1:1 and each method reduces to its same-tokenizer counterpart.
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn

from kdlib.algorithms.base import Algorithm, StudentForward
from kdlib.batch import MicroBatch
from kdlib.config.schema import AlgorithmConfig
from kdlib.losses import LossTerms
from kdlib.models.head import LMHead, lm_head_of
from kdlib.teacher_output import TeacherOutput
from kdlib.xtok.groups import AlignmentBatch, RowKind, SentRows
from kdlib.xtok.method import CrossTokenizerLoss
from kdlib.xtok.vocab import VocabMatch


@dataclass
class CrossTokenizerConfig(AlgorithmConfig):
    """Base of the cross-tokenizer algorithms' configs; each method adds its options as fields."""

    # Weight of the KD term; the CE term on the student's own tokens gets 1 - kd_ratio.
    kd_ratio: float = 0.5

    def check(self) -> None:
        if not 0.0 <= self.kd_ratio <= 1.0:
            raise ValueError(f"kd_ratio must be in [0, 1], got {self.kd_ratio}")


class CrossTokenizerAlgorithm(Algorithm):
    """An algorithm whose loss is a :class:`~kdlib.xtok.method.CrossTokenizerLoss`."""

    needs_alignment = True
    cfg: CrossTokenizerConfig
    # The method's loss class, which knows the teacher rows it reads.
    loss_cls: ClassVar[type[CrossTokenizerLoss]]

    def __init__(self, cfg, loss, teacher_head) -> None:
        super().__init__(cfg, loss, teacher_head)
        self.method: Optional[CrossTokenizerLoss] = None
        self.vocab_match: Optional[VocabMatch] = None

    @classmethod
    def teacher_row_kind(cls, cfg: AlgorithmConfig) -> RowKind:
        return cls.loss_cls.row_kind_for(cfg)

    @abstractmethod
    def build_method(self, student_head: LMHead, match: VocabMatch, weights: dict[str, Any]) -> CrossTokenizerLoss:
        """The method's loss object; ``weights`` are its kd_weight, ce_weight and chunk_size."""

    def attach(self, student: nn.Module, vocab_match: Optional[VocabMatch]) -> None:
        if vocab_match is None:
            raise ValueError(f"algorithm {self.cfg.name!r} needs the matched vocabulary of the two tokenizers")
        device = self.teacher_head.weight.device
        self.vocab_match = vocab_match.to(device)
        weights = dict(kd_weight=self.cfg.kd_ratio, ce_weight=1.0 - self.cfg.kd_ratio, chunk_size=self.loss_cfg.chunk_size)
        self.method = self.build_method(lm_head_of(student), self.vocab_match, weights)

    def loss_of(
        self, fwd: StudentForward, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        if self.method is None:
            raise RuntimeError(f"algorithm {self.cfg.name!r} was not attached to a student")
        if teacher is None:
            raise ValueError(f"algorithm {self.cfg.name!r} got no teacher output for a micro-batch")
        if batch.alignment is None:
            raise ValueError(f"algorithm {self.cfg.name!r} got a micro-batch without its alignment")
        teacher_hidden = teacher_hidden_for(self.method, batch.alignment, teacher)
        with torch.autocast(fwd.hidden.device.type, enabled=False):  # the loss is never autocast
            return self.method(fwd.hidden, fwd.head, teacher_hidden, batch.alignment, fwd.targets, normaliser=normaliser)


def teacher_hidden_for(method: CrossTokenizerLoss, alignment: AlignmentBatch, teacher: TeacherOutput) -> torch.Tensor:
    """The teacher hidden states at the rows ``method`` reads: as sent when the teacher sent only
    those (checked), else picked from an output carrying every teacher loss row (a cache)."""
    rows = method.teacher_rows(alignment)
    if isinstance(teacher.alignment, SentRows):
        sent = teacher.alignment.teacher_rows.to(rows.device)
        if not torch.equal(sent, rows):
            raise ValueError(
                f"the teacher sent {sent.numel()} rows that are not the {rows.numel()} rows the "
                f"{type(method).__name__} reads"
            )
        return teacher.hidden
    teacher.check_rows(alignment.n_teacher_rows, "teacher loss tokens")
    return teacher.hidden[rows.to(teacher.hidden.device)]
