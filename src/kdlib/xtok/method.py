"""What every cross-tokenizer loss shares: inputs, row checks, the CE term and the chunk loop.

A method is a callable object built once per run (it precomputes what depends only on the two
vocabularies and the teacher head) and called per micro-batch with the student's hidden states at
all its loss rows, the student head, the teacher's hidden states at the rows
:meth:`CrossTokenizerLoss.teacher_rows` names, the :class:`~kdlib.xtok.groups.AlignmentBatch` and
the student's next-token targets. It returns kdlib's :class:`~kdlib.losses.LossTerms`:
``(kd_weight * KD + ce_weight * CE) / normaliser``, with KD summed over the aligned groups the
method uses and CE over every student loss row (the unaligned tail included), as in vanilla KD.
Subclasses write only :meth:`CrossTokenizerLoss.kd_sum`, the KD sum of one chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F

from kdlib.config.schema import LossConfig
from kdlib.losses import LossTerms
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.models.head import LMHead
from kdlib.xtok.chunked import Chunk, chunked_loss, plan_chunks
from kdlib.xtok.groups import AlignmentBatch, GroupRows, RowKind

IGNORE_INDEX = -100


def accumulation_dtype(t: torch.Tensor) -> torch.dtype:
    """float64 for float64 inputs (references, gradcheck), float32 otherwise."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def head_logits(head: LMHead, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``head(hidden)`` in the head's dtype (as the model computes it), returned in ``dtype``."""
    return head.logits(hidden).to(dtype)


def divergence(loss: LossConfig, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-row registered divergence ``loss.name`` with its temperature and T^2 option.

    Like :func:`kdlib.losses.per_token_divergence`, but on logits already in float32 or float64
    (kept as they are, so float64 references stay float64) and of equal widths.
    """
    temperature = loss.temperature
    if temperature != 1.0:
        student_logits, teacher_logits = student_logits / temperature, teacher_logits / temperature
    values = LOSSES.get(loss.name)(student_logits, teacher_logits, **loss_params(loss))
    return values * temperature**2 if loss.scale_by_temperature_squared else values


def sub_head(head: LMHead, ids: torch.Tensor) -> LMHead:
    """The head restricted to vocabulary rows ``ids`` (scale and soft-cap act per entry)."""
    bias = None if head.bias is None else head.bias.detach()[ids]
    return replace(head, weight=head.weight.detach()[ids], bias=bias)


@dataclass
class ChunkInputs:
    """One chunk, as a method's :meth:`~CrossTokenizerLoss.kd_sum` sees it (indices are local)."""

    # Student logits of the chunk's rows, [rows, Vs], untempered, with autograd.
    student_logits: torch.Tensor
    # Student hidden states of the chunk's rows, [rows, Hs], with autograd.
    student_hidden: torch.Tensor
    # The student head as differentiated here (weight and bias are autograd leaves).
    student_head: LMHead
    # Extra trainable parameters of the method (DSKD projector weights), as autograd leaves.
    extra: tuple[torch.Tensor, ...]
    # The token each row predicts, [rows].
    student_ids: torch.Tensor
    # Units of the chunk: first local student row and row count, [u].
    student_start: torch.Tensor
    student_len: torch.Tensor
    # Teacher hidden states of the chunk's units, [teacher rows, Ht] (constant).
    teacher_hidden: torch.Tensor
    # First local teacher row and row count of each unit, [u]; the token each teacher row predicts.
    teacher_start: torch.Tensor
    teacher_len: torch.Tensor
    teacher_ids: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.student_logits.dtype


class CrossTokenizerLoss(ABC):
    """Base of the cross-tokenizer methods (overlap, uld, gold, dskd)."""

    # The teacher rows of the groups this method reads (see kdlib.xtok.groups).
    row_kind: ClassVar[RowKind]

    def __init__(
        self, teacher_head: LMHead, *, kd_weight: float = 1.0, ce_weight: float = 1.0, chunk_size: int = 256
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.teacher_head = teacher_head.detached()
        self.kd_weight = float(kd_weight)
        self.ce_weight = float(ce_weight)
        self.chunk_size = int(chunk_size)

    def teacher_rows(self, alignment: AlignmentBatch) -> torch.Tensor:
        """The teacher loss rows whose hidden states this method needs, in the order it reads them."""
        return alignment.rows(self.row_kind).teacher_rows

    def parameters(self) -> list[torch.Tensor]:
        """Trainable tensors of the method itself (none but DSKD's projectors)."""
        return []

    @abstractmethod
    def kd_sum(self, chunk: ChunkInputs) -> torch.Tensor:
        """Sum over the chunk's units of the method's per-unit KD loss (a scalar with autograd)."""

    def __call__(
        self,
        student_hidden: torch.Tensor,
        student_head: LMHead,
        teacher_hidden: torch.Tensor,
        alignment: AlignmentBatch,
        targets: torch.Tensor,
        *,
        normaliser: float = 1.0,
    ) -> LossTerms:
        groups = alignment.rows(self.row_kind)
        n = student_hidden.shape[0]
        if n != alignment.n_student_rows or targets.shape[0] != n:
            raise ValueError(
                f"{type(self).__name__}: {n} student hidden rows and {targets.shape[0]} targets for an "
                f"alignment of {alignment.n_student_rows} student loss rows"
            )
        if teacher_hidden.shape[0] != groups.teacher_rows.shape[0]:
            raise ValueError(
                f"{type(self).__name__}: the teacher sent {teacher_hidden.shape[0]} hidden states, the "
                f"alignment needs {groups.teacher_rows.shape[0]} (teacher_rows())"
            )
        chunks = plan_chunks(groups, n, self.chunk_size)
        targets = targets.reshape(-1).long()
        teacher_hidden = teacher_hidden.detach()

        def compute(chunk: Chunk, hidden, weight, bias, *extra):
            head = replace(student_head, weight=weight, bias=bias)
            logits = head_logits(head, hidden, accumulation_dtype(weight))
            ce = F.cross_entropy(logits, targets[chunk.rows], ignore_index=IGNORE_INDEX, reduction="sum")
            inputs = self._chunk_inputs(chunk, groups, logits, hidden, head, extra, targets, teacher_hidden)
            return self.kd_sum(inputs), ce

        params = [student_head.weight, student_head.bias, *self.parameters()]
        total, kd, ce = chunked_loss(
            compute, chunks, student_hidden, params, kd_weight=self.kd_weight, ce_weight=self.ce_weight
        )
        return LossTerms(loss=total / normaliser, kd_sum=kd, ce_sum=ce, n_tokens=n)

    @staticmethod
    def _chunk_inputs(chunk, groups: GroupRows, logits, hidden, head, extra, targets, teacher_hidden):
        units = chunk.units
        return ChunkInputs(
            student_logits=logits,
            student_hidden=hidden,
            student_head=head,
            extra=tuple(extra),
            student_ids=targets[chunk.rows],
            student_start=groups.student_start[units] - chunk.rows.start,
            student_len=groups.student_len[units],
            teacher_hidden=teacher_hidden[chunk.teacher],
            teacher_start=groups.teacher_start[units] - chunk.teacher.start,
            teacher_len=groups.teacher_len[units],
            teacher_ids=groups.teacher_ids[chunk.teacher],
        )

    def teacher_logits(self, chunk: ChunkInputs, rows: Optional[torch.Tensor] = None, head: Optional[LMHead] = None):
        """Teacher logits (constant) of the chunk's teacher rows, or of ``rows`` of them."""
        hidden = chunk.teacher_hidden if rows is None else chunk.teacher_hidden[rows]
        with torch.no_grad():
            return head_logits(head or self.teacher_head, hidden, chunk.dtype)
