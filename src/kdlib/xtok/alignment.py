"""Byte-offset alignment of two tokenisations of one response: groups of tokens over the same bytes.

Teacher and student render the conversation with their own chat templates (a BOS, a system prompt
or other header text may exist on one side only); only the response is aligned, and its text must
be the same string on both sides. Walking both token lists by their byte ends
(:mod:`kdlib.xtok.offsets`), a group closes whenever both sides end on the same byte, so a group is
one teacher token and one student token (1:1), or several on one or both sides (1:many, many:1,
many:many), and consecutive groups tile the text's bytes. The end-of-turn tokens (``<|im_end|>``,
``<|eot_id|>``, ...) form one last 1:1 group of their own, whatever their text. When
``data.max_len`` cut one side (or both), only the common byte prefix is aligned; the tokens after
the last common boundary are the unaligned tail, trained on by CE alone and counted.

Rows: response token k of a side is predicted by that side's loss row k (``batch.loss_mask``
convention), so group g's first student token ``student_bounds[g]`` is predicted by student loss row
``student_bounds[g]`` of the sample, and likewise for the teacher.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.errors import DataError
from kdlib.xtok.offsets import ResponseTokens


@dataclass(frozen=True)
class SampleAlignment:
    """The groups of one sample; group g = student tokens ``[student_bounds[g], student_bounds[g+1])``
    and teacher tokens ``[teacher_bounds[g], teacher_bounds[g+1])``, over text bytes
    ``[byte_bounds[g], byte_bounds[g+1])`` (the end-of-turn group covers no byte)."""

    # G + 1 student token indices (response-relative); tokens after the last are unaligned.
    student_bounds: tuple[int, ...]
    # G + 1 teacher token indices.
    teacher_bounds: tuple[int, ...]
    # G + 1 byte offsets in the response text.
    byte_bounds: tuple[int, ...]
    # The student's and the teacher's response token ids (all kept tokens, aligned or not).
    student_ids: tuple[int, ...]
    teacher_ids: tuple[int, ...]
    # Bytes of the response text (the denominator of bits per byte).
    text_bytes: int
    # Whether the last group is the pair of end-of-turn tokens.
    end_of_turn: bool

    @property
    def n_groups(self) -> int:
        return len(self.byte_bounds) - 1

    @property
    def n_student(self) -> int:
        return len(self.student_ids)

    @property
    def n_teacher(self) -> int:
        return len(self.teacher_ids)

    @property
    def unaligned_student(self) -> int:
        return self.n_student - self.student_bounds[-1]

    @property
    def unaligned_teacher(self) -> int:
        return self.n_teacher - self.teacher_bounds[-1]

    def groups(self) -> list[tuple[range, range]]:
        """(student token range, teacher token range) of each group."""
        s, t = self.student_bounds, self.teacher_bounds
        return [(range(s[g], s[g + 1]), range(t[g], t[g + 1])) for g in range(self.n_groups)]


def align(
    student: ResponseTokens,
    teacher: ResponseTokens,
    *,
    row: str,
    student_model: str = "student",
    teacher_model: str = "teacher",
) -> SampleAlignment:
    """Group the two sides' tokens of one response by common byte boundaries.

    Fails with a :class:`~kdlib.errors.DataError` naming the row when the two response texts
    differ (templates that strip or add text around the content, a teacher prompt that changed
    the response): aligning different texts would silently pair unrelated tokens.
    """
    s_text, t_text = student.text.encode("utf-8"), teacher.text.encode("utf-8")
    if s_text != t_text:
        at = next((k for k, (a, b) in enumerate(zip(s_text, t_text)) if a != b), min(len(s_text), len(t_text)))
        raise DataError(
            f"{row}: the response text differs between the {student_model} and the {teacher_model} "
            f"renderings (from byte {at}: {s_text[at:at + 20]!r} vs {t_text[at:at + 20]!r}); "
            "cross-tokenizer distillation needs the same response text on both sides"
        )
    s_ends, t_ends = student.ends, teacher.ends
    bounds = [(0, 0, 0)]
    i = j = 0
    while i < len(s_ends) and j < len(t_ends):
        a, b = s_ends[i], t_ends[j]
        if a < b:
            i += 1
        elif b < a:
            j += 1
        else:
            i += 1
            j += 1
            bounds.append((i, j, a))
    if len(bounds) > 1:  # zero-width tokens after the last boundary join the last group
        i0, j0, last = bounds[-1]
        while i0 < len(s_ends) and s_ends[i0] == last:
            i0 += 1
        while j0 < len(t_ends) and t_ends[j0] == last:
            j0 += 1
        bounds[-1] = (i0, j0, last)
    i_end, j_end, last = bounds[-1]
    end_of_turn = (
        student.end_of_turn and teacher.end_of_turn and i_end == len(s_ends) and j_end == len(t_ends)
    )
    if end_of_turn:
        bounds.append((i_end + 1, j_end + 1, last))
    return SampleAlignment(
        student_bounds=tuple(b[0] for b in bounds),
        teacher_bounds=tuple(b[1] for b in bounds),
        byte_bounds=tuple(b[2] for b in bounds),
        student_ids=student.ids,
        teacher_ids=teacher.ids,
        text_bytes=len(s_text),
        end_of_turn=end_of_turn,
    )
