"""Alignment groups of a micro-batch as tensors: what travels with the batch to the student worker.

:class:`AlignmentBatch` concatenates the per-sample groups of :mod:`kdlib.xtok.alignment` over the
samples of a micro-batch, with rows counted the way the workers gather hidden states: the student's
loss rows of all samples in (sample, position) order, and the teacher's loss rows in the same
order. Response token k of sample b is predicted by student loss row ``student_offsets[b] + k``.
Batches concatenate (:meth:`AlignmentBatch.concat`) by shifting rows, so micro-batches can be
split and merged freely.

Each method reads the groups through :meth:`AlignmentBatch.rows` with the :class:`RowKind` it
needs; the answer names the teacher loss rows the teacher has to send (only those, in order), and
indexes the groups into that compact list. ``pairs``: the single row of each 1:1 group (overlap,
dskd); ``group_starts``: the first row of every group (uld); ``group_rows``: every row of every
group (gold and uld with ``merge_groups``, which multiply probabilities along a group).
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import Enum
from typing import Sequence

import torch

from kdlib.xtok.alignment import SampleAlignment


class RowKind(str, Enum):
    """Which teacher rows of the groups a method reads."""

    pairs = "pairs"
    group_starts = "group_starts"
    group_rows = "group_rows"


@dataclass
class GroupRows:
    """The groups a method uses, as row ranges.

    Unit u covers student loss rows ``[student_start[u], + student_len[u])`` and the teacher hidden
    states ``[teacher_start[u], + teacher_len[u])`` of the rows the teacher sends, which are its loss
    rows ``teacher_rows`` (in that order). Units are ordered and disjoint on both sides.
    """

    student_start: torch.Tensor  # [U] long
    student_len: torch.Tensor  # [U] long
    teacher_start: torch.Tensor  # [U] long, into teacher_rows
    teacher_len: torch.Tensor  # [U] long
    teacher_rows: torch.Tensor  # [R] long, teacher loss rows to send
    teacher_ids: torch.Tensor  # [R] long, the teacher token each sent row predicts

    @property
    def n_units(self) -> int:
        return int(self.student_start.shape[0])


@dataclass
class SentRows:
    """The ``alignment`` field of a teacher output that carries only some of its loss rows: which
    ones (sorted), so the student can check they are the rows its method reads."""

    # [R] long: teacher loss rows of the micro-batch, in the order the hidden states are sent.
    teacher_rows: torch.Tensor


@dataclass
class AlignmentBatch:
    """The groups of every sample of a micro-batch; group tensors are [G], sample tensors [B]."""

    # First student loss row of each group and its number of rows (tokens).
    student_start: torch.Tensor
    student_len: torch.Tensor
    # First teacher loss row of each group and its number of rows.
    teacher_start: torch.Tensor
    teacher_len: torch.Tensor
    # Response-text bytes each group covers (0 for the end-of-turn group).
    byte_len: torch.Tensor
    # Sample of each group, and whether it is the end-of-turn group.
    sample: torch.Tensor
    end_of_turn: torch.Tensor  # bool
    # Student / teacher loss rows of sample b are [offsets[b], offsets[b + 1]); [B + 1].
    student_offsets: torch.Tensor
    teacher_offsets: torch.Tensor
    # Bytes of each sample's response text, [B].
    text_bytes: torch.Tensor
    # Response token ids, i.e. the token each loss row predicts, [N_s] and [N_t].
    student_ids: torch.Tensor
    teacher_ids: torch.Tensor

    @classmethod
    def from_samples(cls, samples: Sequence[SampleAlignment]) -> "AlignmentBatch":
        cols: dict[str, list[int]] = {k: [] for k in ("ss", "sl", "ts", "tl", "bl", "sm", "eot")}
        s_off, t_off = [0], [0]
        for b, sample in enumerate(samples):
            for g in range(sample.n_groups):
                sb, tb, yb = sample.student_bounds, sample.teacher_bounds, sample.byte_bounds
                cols["ss"].append(s_off[-1] + sb[g])
                cols["sl"].append(sb[g + 1] - sb[g])
                cols["ts"].append(t_off[-1] + tb[g])
                cols["tl"].append(tb[g + 1] - tb[g])
                cols["bl"].append(yb[g + 1] - yb[g])
                cols["sm"].append(b)
                cols["eot"].append(int(sample.end_of_turn and g == sample.n_groups - 1))
            s_off.append(s_off[-1] + sample.n_student)
            t_off.append(t_off[-1] + sample.n_teacher)

        def long(values) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long)

        return cls(
            student_start=long(cols["ss"]), student_len=long(cols["sl"]),
            teacher_start=long(cols["ts"]), teacher_len=long(cols["tl"]),
            byte_len=long(cols["bl"]), sample=long(cols["sm"]),
            end_of_turn=long(cols["eot"]).bool(),
            student_offsets=long(s_off), teacher_offsets=long(t_off),
            text_bytes=long([s.text_bytes for s in samples]),
            student_ids=long([t for s in samples for t in s.student_ids]),
            teacher_ids=long([t for s in samples for t in s.teacher_ids]),
        )

    @classmethod
    def concat(cls, batches: Sequence["AlignmentBatch"]) -> "AlignmentBatch":
        """One batch of the samples of ``batches``, in order (rows shifted)."""
        parts: dict[str, list[torch.Tensor]] = {f.name: [] for f in fields(cls)}
        n_s = n_t = n_b = 0
        for i, batch in enumerate(batches):
            parts["student_start"].append(batch.student_start + n_s)
            parts["teacher_start"].append(batch.teacher_start + n_t)
            parts["sample"].append(batch.sample + n_b)
            offsets_from = 0 if i == 0 else 1  # the shared boundary appears once
            parts["student_offsets"].append(batch.student_offsets[offsets_from:] + n_s)
            parts["teacher_offsets"].append(batch.teacher_offsets[offsets_from:] + n_t)
            for name in ("student_len", "teacher_len", "byte_len", "end_of_turn", "text_bytes",
                         "student_ids", "teacher_ids"):
                parts[name].append(getattr(batch, name))
            n_s += batch.n_student_rows
            n_t += batch.n_teacher_rows
            n_b += batch.n_samples
        return cls(**{name: torch.cat(values) for name, values in parts.items()})

    def to(self, device: torch.device | str) -> "AlignmentBatch":
        return AlignmentBatch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @property
    def n_groups(self) -> int:
        return int(self.student_start.shape[0])

    @property
    def n_samples(self) -> int:
        return int(self.text_bytes.shape[0])

    @property
    def n_student_rows(self) -> int:
        return int(self.student_offsets[-1])

    @property
    def n_teacher_rows(self) -> int:
        return int(self.teacher_offsets[-1])

    @property
    def one_to_one(self) -> torch.Tensor:
        """[G] bool: groups of exactly one token on each side (the end-of-turn group included)."""
        return (self.student_len == 1) & (self.teacher_len == 1)

    def unaligned_rows(self) -> tuple[int, int]:
        """(student, teacher) loss rows outside every group: the tails cut by truncation."""
        s_grouped = int(self.student_len.sum())
        t_grouped = int(self.teacher_len.sum())
        return self.n_student_rows - s_grouped, self.n_teacher_rows - t_grouped

    def sent_row_offsets(self, teacher_rows: torch.Tensor) -> torch.Tensor:
        """[B + 1] cumulative counts of ``teacher_rows`` (sorted teacher loss rows) per sample: the
        ``row_offsets`` of a teacher output that carries only those rows."""
        return torch.searchsorted(teacher_rows, self.teacher_offsets)

    def rows(self, kind: RowKind) -> GroupRows:
        """The groups as rows for a method reading ``kind`` (see the module docstring)."""
        kind = RowKind(kind)
        if kind is RowKind.group_rows:
            s_start, s_len = self.student_start, self.student_len
            t_first, t_len = self.teacher_start, self.teacher_len
        else:
            keep = self.one_to_one if kind is RowKind.pairs else torch.ones_like(self.one_to_one)
            s_start, t_first = self.student_start[keep], self.teacher_start[keep]
            s_len = torch.ones_like(s_start)
            t_len = torch.ones_like(t_first)
        t_compact = torch.cumsum(t_len, 0) - t_len
        total = int(t_len.sum())
        shift = torch.repeat_interleave(t_first - t_compact, t_len, output_size=total)
        teacher_rows = shift + torch.arange(total, device=shift.device)
        return GroupRows(
            student_start=s_start, student_len=s_len, teacher_start=t_compact, teacher_len=t_len,
            teacher_rows=teacher_rows, teacher_ids=self.teacher_ids[teacher_rows],
        )
