"""Image+text training samples: rows -> conversations -> each model's tokens, and their collation.

The counterpart of :mod:`kdlib.data.samples` for vision-language models, with the same rules: a
sample longer than ``data.max_len`` keeps its whole prompt (images included) and loses the end of
its response (``overlong=truncate``) or is left out (``overlong=drop``); every dropped or truncated
sample is counted in the :class:`~kdlib.data.samples.FilterReport`. A row whose image is missing,
unreadable or too large stops the run with a one-line error, or is dropped and counted by cause
with ``bad_images=drop``.

A sample keeps its token ids, spans and image references, not pixel tensors: a dataset's pixels
would not fit in memory at scale. :func:`collate_vision` opens the images of one micro-batch again
and lets each model's image processor lay out its tensors. When the teacher renders samples
differently (another resolution, template or tokenizer), it gets its own tokens and images;
otherwise it reads the student's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.batch import MicroBatch
from kdlib.config.schema import DataConfig
from kdlib.data.batching import collate
from kdlib.data.encoding import EncodedChat
from kdlib.data.images import BadImageError, BadImages, ImageDataConfig, ImageRef, open_image
from kdlib.data.multimodal import data_root, detect_vision_format, row_to_vision_conversation
from kdlib.data.samples import FilterReport, Sample, Sequence, _fit, _match_teacher, load_split
from kdlib.data.vision_encoding import VisionChatEncoder, VisionEncoding, VisionInputs


@dataclass
class VisionSequence(Sequence):
    """One model's token ids for a sample, with its per-token modality ids when it takes them."""

    token_types: Optional[list[int]] = None


@dataclass
class VisionSample(Sample):
    """A training or evaluation example with images (``student``/``teacher`` are VisionSequences)."""

    images: list[ImageRef] = field(default_factory=list)
    # '<key>: <file>, row <n>' for errors when the images are opened again at collation.
    where: str = ""


@dataclass
class VisionMicroBatch:
    """A micro-batch's token views and each view's image inputs."""

    tokens: MicroBatch
    student_images: Optional[VisionInputs]
    # The teacher's own image inputs; None when it reads the student's view (tokens.teacher is None).
    teacher_images: Optional[VisionInputs] = None

    @property
    def teacher_view_images(self) -> Optional[VisionInputs]:
        return self.teacher_images if self.tokens.teacher is not None else self.student_images


def build_vision_samples(
    cfg: DataConfig,
    options: ImageDataConfig,
    split: str,
    student: VisionChatEncoder,
    teacher: Optional[VisionChatEncoder] = None,
) -> tuple[list[VisionSample], FilterReport]:
    """Samples of ``split`` ("train" or "eval") and the report of what was filtered.

    ``teacher`` is given only when the teacher renders samples differently from the student.
    """
    source = load_split(cfg, split)
    fmt = detect_vision_format(list(source.rows.column_names), cfg, f"{source.key}: {source.name}")
    base_dir = data_root(source.name)
    report = FilterReport(source=source.name, rows=len(source.rows))
    samples = []
    for index, raw in enumerate(source.rows):
        where = f"{source.key}: {source.where(index)}"
        try:
            conversation = row_to_vision_conversation(raw, fmt, cfg, options, base_dir, where)
            images = [open_image(ref, options, where) for ref in conversation.images]
        except BadImageError as exc:
            if options.bad_images is BadImages.error:
                raise
            report.dropped[exc.reason] += 1
            continue
        encoded = student.encode(conversation, images, where)
        if encoded is None:
            report.dropped["empty response"] += 1
            continue
        student_seq, reason, truncated = _fit_vision(encoded, cfg)
        if student_seq is None:
            report.dropped[reason] += 1
            continue
        teacher_seq = None
        if teacher is not None:
            teacher_seq = _match_vision_teacher(teacher.encode(conversation, images, where), student_seq)
            if teacher_seq is None:
                report.dropped["teacher tokenises the response differently"] += 1
                continue
        report.kept += 1
        report.truncated += int(truncated)
        samples.append(VisionSample(index, student_seq, teacher_seq, images=conversation.images, where=where))
    return samples, report


def collate_vision(
    samples: list[VisionSample],
    options: ImageDataConfig,
    student: VisionChatEncoder,
    teacher: Optional[VisionChatEncoder] = None,
) -> VisionMicroBatch:
    """Right-padded token views (as :func:`kdlib.data.batching.collate`) and each view's images.

    ``teacher`` is the teacher's encoder when the samples carry teacher sequences.
    """
    tokens = collate(samples, student_pad_id=student.pad_id, teacher_pad_id=teacher.pad_id if teacher else None)
    images = [[open_image(ref, options, sample.where) for ref in sample.images] for sample in samples]
    student_images = _view_images(student, images, [s.student for s in samples], tokens.student.input_ids.shape[1])
    teacher_images = None
    if tokens.teacher is not None:
        assert teacher is not None, "teacher sequences need the teacher's encoder"
        length = tokens.teacher.input_ids.shape[1]
        teacher_images = _view_images(teacher, images, [s.teacher for s in samples], length)
    return VisionMicroBatch(tokens, student_images, teacher_images)


def _view_images(encoder: VisionChatEncoder, images: list[list], sequences: list, length: int) -> Optional[VisionInputs]:
    inputs = encoder.batch_images(images)
    token_types = encoder.pad_token_types([s.token_types for s in sequences], length)
    if token_types is None:
        return inputs
    inputs = inputs or VisionInputs(token_types_key=encoder.token_types_key)
    inputs.token_types = token_types
    return inputs


def _fit_vision(encoded: VisionEncoding, cfg: DataConfig) -> tuple[Optional[VisionSequence], str, bool]:
    """:func:`kdlib.data.samples._fit` (max_len and overlong) keeping the token types aligned."""
    fitted, reason, truncated = _fit(EncodedChat(encoded.input_ids, encoded.response_start), cfg)
    if fitted is None:
        return None, reason, False
    return _with_types(fitted, encoded.token_types), "", truncated


def _match_vision_teacher(encoded: Optional[VisionEncoding], student: Sequence) -> Optional[VisionSequence]:
    if encoded is None:
        return None
    matched = _match_teacher(EncodedChat(encoded.input_ids, encoded.response_start), student)
    return None if matched is None else _with_types(matched, encoded.token_types)


def _with_types(sequence: Sequence, token_types: Optional[list[int]]) -> VisionSequence:
    types = None if token_types is None else token_types[: len(sequence)]
    return VisionSequence(sequence.input_ids, sequence.response_start, types)
