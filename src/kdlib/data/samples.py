"""Training and evaluation samples: rows -> conversations -> token ids for student and teacher.

This is where samples are kept, truncated or dropped, and every such decision is counted in a
:class:`FilterReport` that the run logs, so no sample disappears silently. A sample longer than
``data.max_len`` keeps its whole prompt and loses the end of its response (``overlong=truncate``)
or is left out (``overlong=drop``); a sample whose prompt alone does not fit is always left out.
Across tokenizers (a :class:`~kdlib.data.cross_tokenizer.ResponseAligner` is given) each side is
tokenised and fitted on its own, the two responses are aligned by byte offsets, and a response
that cannot be aligned fails the run or is dropped and counted (``data.unalignable``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from itertools import takewhile
from typing import TYPE_CHECKING, Optional

from kdlib.cache.fingerprint import sample_key
from kdlib.config.schema import DataConfig, Overlong, Unalignable
from kdlib.data.encoding import ChatEncoder, EncodedChat
from kdlib.data.formats import Conversation, detect_format, privileged_conversation, row_to_conversation
from kdlib.data.sources import RowSource, load_rows
from kdlib.errors import DataError

if TYPE_CHECKING:
    from kdlib.data.cross_tokenizer import ResponseAligner
    from kdlib.routing import SampleRoute
    from kdlib.xtok.alignment import SampleAlignment

log = logging.getLogger(__name__)

# The FilterReport reason of a response that cannot be aligned across the tokenizers.
UNALIGNABLE = "cannot be aligned across the tokenizers"


@dataclass
class Sequence:
    """One model's token ids for a sample; tokens [response_start, len) are trained."""

    input_ids: list[int]
    response_start: int

    @property
    def n_loss_tokens(self) -> int:
        return len(self.input_ids) - self.response_start

    def __len__(self) -> int:
        return len(self.input_ids)


@dataclass
class Sample:
    """A training or evaluation example."""

    index: int  # row in the source dataset
    student: Sequence
    # The teacher's own tokens when its tokenisation differs; None = it reads the student's.
    teacher: Optional[Sequence] = None
    # Whether a teacher cache may keep this sample's teacher output (not for one-off rollouts).
    cacheable: bool = True
    # Cross-tokenizer algorithms: the byte-offset groups of the two responses.
    alignment: Optional["SampleAlignment"] = None
    # UTF-8 bytes of the response text the student's kept tokens spell (bits per byte), and the
    # teacher's (None: the same tokens, the same bytes).
    response_bytes: int = 0
    teacher_response_bytes: Optional[int] = None
    # Several teachers: the teacher or ensemble this sample goes to (kdlib.routing); None otherwise.
    route: Optional["SampleRoute"] = None
    # On-policy with a reward: the rollout's group-normalised advantage (kdlib.rewards.advantages),
    # given to every one of its loss tokens; None without a reward.
    advantage: Optional[float] = None
    # On-policy rollouts: the rollout engine's log-probability of each trained response token
    # (kdlib.backends.Generation.logprobs, cut as the response was); None otherwise.
    rollout_logprobs: Optional[list[float]] = None

    @property
    def teacher_view(self) -> Sequence:
        return self.teacher if self.teacher is not None else self.student

    def teacher_key(self) -> str:
        """The content key of the teacher's view of this sample (see kdlib.cache.fingerprint)."""
        view = self.teacher_view
        return sample_key(view.input_ids, view.response_start)


@dataclass
class FilterReport:
    """What happened to the rows of one dataset."""

    source: str
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped: Counter = field(default_factory=Counter)
    # Cross-tokenizer: response tokens of kept samples outside every group (after a cut by
    # data.max_len on one side), trained by CE only.
    unaligned_student_tokens: int = 0
    unaligned_teacher_tokens: int = 0
    # Rows of the file after the first data.max_samples / data.eval_max_samples, not read.
    beyond_limit: int = 0
    limit_key: str = ""

    @classmethod
    def of(cls, source: "RowSource") -> "FilterReport":
        """An empty report for the rows of ``source`` (carrying its row limit)."""
        return cls(source=source.name, rows=len(source.rows), beyond_limit=source.beyond_limit,
                   limit_key=source.limit_key)

    def summary(self) -> str:
        parts = [f"{self.kept}/{self.rows} samples kept from {self.source}"]
        if self.beyond_limit:
            parts.append(f"{self.beyond_limit} further rows not read ({self.limit_key}={self.rows})")
        if self.truncated:
            parts.append(f"{self.truncated} truncated")
        for reason, count in sorted(self.dropped.items()):
            parts.append(f"{count} dropped ({reason})")
        if self.unaligned_student_tokens or self.unaligned_teacher_tokens:
            parts.append(f"{self.unaligned_student_tokens} student / {self.unaligned_teacher_tokens} teacher "
                         "response tokens unaligned (cut by data.max_len on one side)")
        return ", ".join(parts)

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "rows": self.rows,
            "kept": self.kept,
            "truncated": self.truncated,
            "dropped": dict(self.dropped),
            "unaligned_student_tokens": self.unaligned_student_tokens,
            "unaligned_teacher_tokens": self.unaligned_teacher_tokens,
            "beyond_limit": self.beyond_limit,
        }


@dataclass
class Row:
    """One dataset row as conversations: the student's, and the teacher's privileged one if any."""

    index: int
    conversation: Conversation
    teacher_conversation: Optional[Conversation] = None
    # The row as the file holds it (every column), for rewards that read a column of it.
    data: dict = field(default_factory=dict)


def load_conversations(source: RowSource, cfg: DataConfig) -> list[Row]:
    """The conversations of every row of ``source`` (and the teacher's, with teacher_input_key)."""
    columns = list(source.rows.column_names)
    fmt = detect_format(columns, cfg, f"{source.key}: {source.name}")
    rows = []
    for i, raw in enumerate(source.rows):
        where = f"{source.key}: {source.where(i)}"
        conversation = row_to_conversation(raw, fmt, cfg, where)
        teacher = None
        if cfg.teacher_input_key:
            teacher = privileged_conversation(raw, conversation, cfg.teacher_input_key, where)
        rows.append(Row(i, conversation, teacher, dict(raw)))
    return rows


@dataclass
class Prompt:
    """A prompt for on-policy rollouts: the student's token ids and, if different, the teacher's."""

    index: int
    student_ids: list[int]
    teacher_ids: Optional[list[int]] = None
    conversation: Conversation = field(default_factory=list)
    # The prompt's data row (every column of the file): what a reward compares the response with.
    row: dict = field(default_factory=dict)


def build_prompts(
    cfg: DataConfig, student: ChatEncoder, teacher: Optional[ChatEncoder] = None, split: str = "train",
) -> tuple[list[Prompt], FilterReport]:
    """Prompts of ``split`` (data.train, or data.eval for the held-out reward); a trailing
    assistant turn is dropped: the student writes its own."""
    source = load_split(cfg, split)
    report = FilterReport.of(source)
    prompts = []
    for row in load_conversations(source, cfg):
        prompt = without_response(row.conversation)
        where = f"{source.key}: {source.where(row.index)}"
        ids = student.encode_prompt(prompt, where)
        teacher_ids = None
        if teacher is not None:
            teacher_ids = teacher.encode_prompt(without_response(row.teacher_conversation or row.conversation), where)
        if max(len(ids), len(teacher_ids or [])) >= cfg.max_len:
            report.dropped[f"prompt longer than data.max_len={cfg.max_len}"] += 1
            continue
        report.kept += 1
        prompts.append(Prompt(row.index, ids, teacher_ids, prompt, row.data))
    return prompts, report


def without_response(conversation: Conversation) -> Conversation:
    return conversation[:-1] if conversation and conversation[-1]["role"] == "assistant" else conversation


def build_samples(
    cfg: DataConfig,
    split: str,
    student: ChatEncoder,
    teacher: Optional[ChatEncoder] = None,
    aligner: Optional["ResponseAligner"] = None,
) -> tuple[list[Sample], FilterReport]:
    """Samples of ``split`` ("train" or "eval") and the report of what was filtered.

    ``teacher`` is given only when the teacher tokenises differently from the student;
    ``aligner`` only for cross-tokenizer algorithms (then the two responses are aligned, with
    ``teacher`` None meaning the teacher reads the student's tokens).
    """
    source = load_split(cfg, split)
    report = FilterReport.of(source)
    samples = []
    for row in load_conversations(source, cfg):
        where = f"{source.key}: {source.where(row.index)}"
        sample, reason, truncated = row_sample(row, where, cfg, student, teacher, aligner, report)
        if sample is None:
            report.dropped[reason] += 1
            continue
        report.kept += 1
        report.truncated += int(truncated)
        samples.append(sample)
    return samples, report


def row_sample(
    row: Row, where: str, cfg: DataConfig, student: ChatEncoder, teacher: Optional[ChatEncoder],
    aligner: Optional["ResponseAligner"], report: FilterReport,
) -> tuple[Optional[Sample], str, bool]:
    """One row as a sample, as :func:`build_samples` makes it: (sample or None, the reason it was
    dropped, whether it was truncated)."""
    index, conversation = row.index, row.conversation
    encoded = student.encode(conversation, where)
    if encoded is None:
        return None, "empty response", False
    student_seq, reason, truncated = _fit(encoded, cfg)
    if student_seq is None:
        return None, reason, False
    teacher_encoded = None
    if teacher is not None:
        teacher_encoded = teacher.encode(row.teacher_conversation or conversation, where)
    if teacher is not None and teacher_encoded is None:
        return None, "empty teacher response", truncated
    if aligner is not None:
        sample, reason, teacher_truncated = _aligned_sample(
            index, encoded, student_seq, teacher_encoded, cfg, aligner, where, report
        )
        return sample, reason, truncated or teacher_truncated
    sample = Sample(index=index, student=student_seq,
                    response_bytes=response_bytes(student, student_seq.input_ids[student_seq.response_start:]))
    if teacher is not None:
        sample.teacher = _match_teacher(teacher_encoded, student_seq)
        if sample.teacher is None:
            return None, "teacher tokenises the response differently", truncated
    return sample, "", truncated


def _aligned_sample(
    index: int, encoded: EncodedChat, student_seq: Sequence, teacher_encoded: Optional[EncodedChat], cfg: DataConfig,
    aligner: "ResponseAligner", where: str, report: FilterReport,
) -> tuple[Optional[Sample], str, bool]:
    """A sample with both sides fitted to data.max_len on their own and aligned: (sample or None,
    reason if dropped, whether the teacher side was cut)."""
    teacher_seq, teacher_truncated = None, False
    teacher_text = encoded.response_text
    if teacher_encoded is not None:  # the teacher has its own tokens (None: it reads the student's)
        teacher_seq, reason, teacher_truncated = _fit(teacher_encoded, cfg)
        if teacher_seq is None:
            return None, f"teacher: {reason}", False
        teacher_text = teacher_encoded.response_text
    teacher_view = teacher_seq or student_seq
    try:
        aligned = aligner.align(
            student_seq.input_ids[student_seq.response_start:], encoded.response_text,
            teacher_view.input_ids[teacher_view.response_start:], teacher_text, row=where,
        )
    except DataError as exc:
        if cfg.unalignable is Unalignable.error:
            raise
        if not report.dropped[UNALIGNABLE]:  # the first one, so the user sees why
            log.warning("%s (data.unalignable=drop: dropped and counted)", exc)
        return None, UNALIGNABLE, False
    alignment = aligned.alignment
    if alignment.n_groups == 0:
        return None, "no aligned token left after data.max_len", False
    report.unaligned_student_tokens += alignment.unaligned_student
    report.unaligned_teacher_tokens += alignment.unaligned_teacher
    sample = Sample(index=index, student=student_seq, teacher=teacher_seq, alignment=alignment,
                    response_bytes=aligned.student_bytes, teacher_response_bytes=aligned.teacher_bytes)
    return sample, "", teacher_truncated


def response_bytes(encoder: ChatEncoder, response_ids: list[int]) -> int:
    """UTF-8 bytes of the response text that ``response_ids`` spell (end of turn excluded)."""
    text_ids = list(takewhile(lambda t: t not in encoder.end_of_turn_ids, response_ids))
    text = encoder.tokenizer.decode(text_ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    return len(text.encode("utf-8"))


def load_split(cfg: DataConfig, split: str) -> RowSource:
    """The rows of ``split`` ("train": data.train, "eval": data.eval) with the split's row limit."""
    train = split == "train"
    return load_rows(
        cfg.train if train else cfg.eval,
        split=cfg.train_split if train else cfg.eval_split,
        key=f"data.{split}",
        max_rows=cfg.max_samples if train else cfg.eval_max_samples,
        limit_key="data.max_samples" if train else "data.eval_max_samples",
    )


def _fit(encoded: EncodedChat, cfg: DataConfig) -> tuple[Optional[Sequence], str, bool]:
    """Apply max_len: (sequence or None, reason if dropped, whether truncated)."""
    if encoded.response_start < 1:  # nothing before the response: no position predicts its first token
        return None, "empty prompt", False
    if len(encoded) <= cfg.max_len:
        return Sequence(encoded.input_ids, encoded.response_start), "", False
    if cfg.overlong is Overlong.drop:
        return None, f"longer than data.max_len={cfg.max_len}", False
    if encoded.response_start + 1 > cfg.max_len:  # not even one response token fits
        return None, f"prompt longer than data.max_len={cfg.max_len}", False
    return Sequence(encoded.input_ids[: cfg.max_len], encoded.response_start), "", True


def _match_teacher(encoded: Optional[EncodedChat], student: Sequence) -> Optional[Sequence]:
    """The teacher's sequence with the student's (possibly truncated) response, or None if the
    response token ids differ (vanilla KD compares distributions token by token)."""
    if encoded is None:
        return None
    response = student.input_ids[student.response_start:]
    if encoded.response_ids[: len(response)] != response:
        return None
    return Sequence(encoded.input_ids[: encoded.response_start] + response, encoded.response_start)


def rollout_sample(
    prompt: Prompt, response_ids: list[int], max_len: int, *, encoder: Optional[ChatEncoder] = None,
    aligner: Optional["ResponseAligner"] = None,
) -> tuple[Sample, bool]:
    """A training sample from a sampled response: the student trains on exactly the sampled ids
    (no re-tokenisation, no end token added to a response cut by max_new_tokens); the loss covers
    the response tokens and nothing else. Returns (sample, whether max_len cut the response).

    Across tokenizers (``aligner``), the teacher reads the sampled text in its own tokens and the
    two are aligned; otherwise it reads the same ids after its own prompt. ``encoder`` (the
    student's) gives the response bytes for bits per byte.
    """
    student_room = max_len - len(prompt.student_ids)
    teacher_ids = prompt.teacher_ids if prompt.teacher_ids is not None else prompt.student_ids
    if aligner is not None:
        both = aligner.rollout(response_ids, student_room=student_room, teacher_room=max_len - len(teacher_ids),
                               row=f"rollout of data.train row {prompt.index}")
        if both.unaligned_reason:
            log.debug("unaligned rollout tokens: %s", both.unaligned_reason)
        sample = Sample(
            index=prompt.index, student=Sequence(prompt.student_ids + both.student_ids, len(prompt.student_ids)),
            teacher=Sequence(teacher_ids + both.teacher_ids, len(teacher_ids)), cacheable=False,
            alignment=both.response.alignment, response_bytes=both.response.student_bytes,
            teacher_response_bytes=both.response.teacher_bytes,
        )
        return sample, len(both.student_ids) < len(response_ids)
    room = student_room
    if prompt.teacher_ids is not None:
        room = min(room, max_len - len(prompt.teacher_ids))
    kept = response_ids[:room]
    student = Sequence(prompt.student_ids + kept, len(prompt.student_ids))
    teacher = None
    if prompt.teacher_ids is not None:
        teacher = Sequence(prompt.teacher_ids + kept, len(prompt.teacher_ids))
    sample = Sample(index=prompt.index, student=student, teacher=teacher, cacheable=False,
                    response_bytes=0 if encoder is None else response_bytes(encoder, kept))
    return sample, len(kept) < len(response_ids)
