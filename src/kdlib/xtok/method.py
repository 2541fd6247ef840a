"""What every cross-tokenizer method shares: its inputs, the row checks, and its place in the engine.

A method is a callable object built once per run (it precomputes what depends only on the two
vocabularies and the teacher head) and called per micro-batch with the student's hidden states at
all its loss rows, the student head, the teacher's hidden states at the rows
:meth:`CrossTokenizerLoss.teacher_rows` names, the :class:`~kdlib.xtok.groups.AlignmentBatch` and
the student's next-token targets. It returns kdlib's :class:`~kdlib.losses.LossTerms`:
``(kd_weight * KD + ce_weight * CE) / normaliser``, with KD summed over the aligned groups the
method uses and CE over every student loss row (the unaligned tail included), as in vanilla KD.
The methods compare distributions that are not token by token (sorted probabilities, products
along a group, projections between hidden spaces), so each is a general-path term of
:mod:`kdlib.losses.engine` (autograd per chunk); this module cuts the rows into chunks that never
split a group and gives each method its chunk as :class:`ChunkInputs`. Subclasses write only
:meth:`CrossTokenizerLoss.kd_sum`, the KD sum of one chunk.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar, Mapping, Optional

import torch

from kdlib.config.schema import LossConfig
from kdlib.losses.engine import AutogradTerm, Chunk, Plan, StudentRows, evaluate, head_logits
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.losses.terms import LossTerms
from kdlib.models.head import LMHead
from kdlib.xtok.groups import AlignmentBatch, GroupRows, RowKind


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


def plan_chunks(groups: GroupRows, n_rows: int, chunk_size: int) -> tuple[Chunk, ...]:
    """Cut [0, n_rows) into chunks of at most ``chunk_size`` student rows and at most
    ``chunk_size`` teacher rows, never inside a unit.

    A unit longer than ``chunk_size`` on either side gets a chunk of its own. Rows outside every
    unit (CE only) belong to whichever chunk covers them.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    starts = groups.student_start.tolist()
    ends = (groups.student_start + groups.student_len).tolist()
    t_starts = groups.teacher_start.tolist()
    t_ends = (groups.teacher_start + groups.teacher_len).tolist()
    chunks = []
    lo = unit = 0
    while lo < n_rows:
        hi = min(lo + chunk_size, n_rows)
        first = unit
        while unit < len(starts) and starts[unit] < hi:
            too_long = ends[unit] > hi or (unit > first and t_ends[unit] - t_starts[first] > chunk_size)
            if too_long:
                if starts[unit] > lo:  # cut before this unit
                    hi = starts[unit]
                    break
                hi = ends[unit]  # a unit longer than a chunk, at the chunk's start: take it whole
            unit += 1
        teacher = slice(t_starts[first], t_ends[unit - 1]) if unit > first else slice(0, 0)
        chunks.append(Chunk(rows=slice(lo, hi), units=slice(first, unit), teacher=teacher))
        lo = hi
    return tuple(chunks)


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
    """Base of the cross-tokenizer methods (overlap, uld, gold, dskd, marginal)."""

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

    @classmethod
    def row_kind_for(cls, options: Any) -> RowKind:
        """The teacher rows a method with these options (its algorithm config) reads."""
        return cls.row_kind

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
        term = _GroupTerm(teacher={"hidden": teacher_hidden.detach(), "ids": groups.teacher_ids}, method=self,
                          groups=groups)
        plan = Plan(chunks=plan_chunks(groups, n, self.chunk_size), head=student_head, term=term,
                    targets=targets.reshape(-1).long(), kd_weight=self.kd_weight, ce_weight=self.ce_weight)
        total, kd, ce = evaluate(plan, student_hidden, student_head.weight, student_head.bias, self.parameters())
        return LossTerms(loss=total / normaliser, kd_sum=kd, ce_sum=ce, n_tokens=n)

    def teacher_logits(self, chunk: ChunkInputs, rows: Optional[torch.Tensor] = None, head: Optional[LMHead] = None):
        """Teacher logits (constant) of the chunk's teacher rows, or of ``rows`` of them."""
        hidden = chunk.teacher_hidden if rows is None else chunk.teacher_hidden[rows]
        with torch.no_grad():
            return head_logits(head or self.teacher_head, hidden, chunk.dtype)


@dataclass(frozen=True)
class _GroupTerm(AutogradTerm):
    """A method on one micro-batch's groups, as the engine's term: its teacher rows are the
    hidden states sent for the groups and the token each of them predicts."""

    teacher: Mapping[str, torch.Tensor]  # {"hidden": [R, Ht], "ids": [R]}
    method: CrossTokenizerLoss
    groups: GroupRows

    def kd_sum(self, chunk: Chunk, student: StudentRows, teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        units, groups = chunk.units, self.groups
        return self.method.kd_sum(ChunkInputs(
            student_logits=student.logits,
            student_hidden=student.hidden,
            student_head=student.head,
            extra=student.extra,
            student_ids=student.targets,
            student_start=groups.student_start[units] - chunk.rows.start,
            student_len=groups.student_len[units],
            teacher_hidden=teacher["hidden"],
            teacher_start=groups.teacher_start[units] - chunk.teacher.start,
            teacher_len=groups.teacher_len[units],
            teacher_ids=teacher["ids"],
        ))
