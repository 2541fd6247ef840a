"""Cross-tokenizer samples: both models' tokens of one response and their byte-offset alignment.

When the algorithm distils across tokenizers, each model renders the conversation with its own chat
template and tokenises it; the response text is the same string on both sides. A
:class:`ResponseAligner` places each side's kept response tokens in that text
(:func:`kdlib.xtok.offsets.response_tokens`) and groups them (:func:`kdlib.xtok.alignment.align`):
for dataset samples from each side's rendered response, and for on-policy rollouts from the
student's sampled ids, whose text is re-tokenised for the teacher here (the only re-tokenisation
anywhere). What cannot be aligned exactly is a one-line :class:`~kdlib.errors.DataError` naming
the model and the row; dataset samples then fail or are dropped and counted (``data.unalignable``),
rollouts keep their tokens unaligned (CE only) and are counted.
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Optional

from kdlib.data.encoding import ChatEncoder
from kdlib.errors import DataError
from kdlib.xtok.alignment import SampleAlignment, align
from kdlib.xtok.offsets import ResponseTokens, response_tokens
from kdlib.xtok.token_bytes import TokenBytes
from kdlib.xtok.vocab import VocabMatch, match_vocabularies


@dataclass(frozen=True)
class AlignedResponse:
    """The groups of one sample, and the response bytes each side's kept tokens cover."""

    alignment: SampleAlignment
    # UTF-8 bytes of the response text covered by the kept tokens (the bits-per-byte denominator).
    student_bytes: int
    teacher_bytes: int


@dataclass(frozen=True)
class AlignedRollout:
    """A sampled response as both models train on it."""

    # The student's kept sampled ids and the teacher's ids for the same text (both cut to fit).
    student_ids: list[int]
    teacher_ids: list[int]
    response: AlignedResponse
    # Why the response (or its end) is unaligned, if it is: None when every kept token is grouped.
    unaligned_reason: Optional[str] = None


class ResponseAligner:
    """Aligns the two tokenisations of responses for one (student, teacher) tokenizer pair."""

    def __init__(self, student: ChatEncoder, teacher: ChatEncoder, *, student_model: str, teacher_model: str) -> None:
        self.student, self.teacher = student, teacher
        self.student_model, self.teacher_model = student_model, teacher_model
        # Parsing a tokenizer's description once; a slow tokenizer fails here, naming the model.
        self._student_bytes = TokenBytes(student.tokenizer, model=student_model)
        self._teacher_bytes = TokenBytes(teacher.tokenizer, model=teacher_model)
        self._match: Optional[VocabMatch] = None

    def vocab_match(self) -> VocabMatch:
        """The matched sub-vocabulary of the two tokenizers (computed once; shipped to the students)."""
        if self._match is None:
            self._match = match_vocabularies(self.student.tokenizer, self.teacher.tokenizer)
        return self._match

    def align(
        self, student_ids: list[int], student_text: Optional[str], teacher_ids: list[int],
        teacher_text: Optional[str], *, row: str,
    ) -> AlignedResponse:
        """Groups of one response: each side's kept response ids (possibly cut by data.max_len,
        end-of-turn token included when kept) and the rendered text they were tokenised from."""
        student = self._tokens("student", student_ids, student_text, row)
        teacher = self._tokens("teacher", teacher_ids, teacher_text, row)
        return self._aligned(student, teacher, row)

    def rollout(self, sampled_ids: list[int], *, student_room: int, teacher_room: int, row: str) -> AlignedRollout:
        """Both sides of a sampled response: the student keeps its own ids (at most
        ``student_room``); the teacher gets the text those ids spell, tokenised with its tokenizer,
        and its end-of-turn token when the student ended its turn (at most ``teacher_room`` ids).

        A sample can end inside a multi-byte character (the student stopped mid-character, or
        emitted byte tokens that are not valid UTF-8): only its longest prefix of whole characters
        is text both models can read; the rest stays unaligned (the student's CE still covers it).
        """
        student_tok = self.student.tokenizer
        ended = bool(sampled_ids) and sampled_ids[-1] in self.student.end_of_turn_ids
        text_ids = sampled_ids[:-1] if ended else list(sampled_ids)
        valid = self._whole_characters(text_ids)
        whole = valid == len(text_ids)
        text = student_tok.decode(text_ids[:valid], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        teacher_ids = list(self.teacher.tokenizer(text, add_special_tokens=False)["input_ids"])
        if ended and whole:
            teacher_ids.append(self.teacher.end_of_turn_id)
        student_kept, teacher_kept = list(sampled_ids[:student_room]), teacher_ids[:teacher_room]
        placed = student_kept if whole else student_kept[:valid]
        reason = None if whole else "the sample is not valid UTF-8 text from some token on"
        try:
            student = self._tokens("student", placed, text, row)
            student = ResponseTokens(ids=tuple(student_kept), ends=student.ends, text=student.text,
                                     end_of_turn=student.end_of_turn)
            teacher = self._tokens("teacher", teacher_kept, text, row)
            response = self._aligned(student, teacher, row)
        except DataError as exc:
            reason = str(exc)
            empty = SampleAlignment(
                student_bounds=(0,), teacher_bounds=(0,), byte_bounds=(0,), student_ids=tuple(student_kept),
                teacher_ids=tuple(teacher_kept), text_bytes=len(text.encode("utf-8")), end_of_turn=False,
            )
            response = AlignedResponse(empty, 0, 0)
        return AlignedRollout(student_kept, teacher_kept, response, reason)

    def _tokens(self, side: str, ids: list[int], text: Optional[str], row: str) -> ResponseTokens:
        encoder = self.student if side == "student" else self.teacher
        return response_tokens(
            encoder.tokenizer, ids, text=text, end_of_turn_ids=encoder.end_of_turn_ids, row=row,
            model=self.student_model if side == "student" else self.teacher_model,
            token_bytes=self._student_bytes if side == "student" else self._teacher_bytes,
        )

    def _aligned(self, student: ResponseTokens, teacher: ResponseTokens, row: str) -> AlignedResponse:
        alignment = align(student, teacher, row=row, student_model=self.student_model, teacher_model=self.teacher_model)
        return AlignedResponse(alignment, student.covered_bytes, teacher.covered_bytes)

    def _whole_characters(self, ids: list[int]) -> int:
        """How many leading ``ids`` spell whole UTF-8 characters (stopping at the first invalid
        byte, and never inside a character)."""
        decoder = codecs.getincrementaldecoder("utf-8")()
        valid = 0
        for k, token in enumerate(ids):
            try:
                decoder.decode(self._student_bytes.bytes_of(token))
            except UnicodeDecodeError:
                break
            if not decoder.getstate()[0]:  # no bytes pending: a character boundary
                valid = k + 1
        return valid
