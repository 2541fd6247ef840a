"""Image+text training samples and prompts: rows -> conversations -> each model's tokens.

The counterpart of :mod:`kdlib.data.samples` for vision-language models, with the same rules: a
sample longer than ``data.max_len`` keeps its whole prompt (images included) and loses the end of
its response (``overlong=truncate``) or is left out (``overlong=drop``); every dropped or truncated
sample is counted in the :class:`~kdlib.data.samples.FilterReport`. A row whose image is missing,
unreadable or too large stops the run with a one-line error, or is dropped and counted by cause
with ``data.bad_images=drop``.

A sample keeps its token ids, spans, per-token modality ids, image references and the images'
content digests (part of its teacher-cache key), not pixel tensors: a dataset's pixels would not
fit in memory at scale, and the workers lay out pixels with their own processors.
:func:`collate_vision` pads the token views as :func:`kdlib.data.batching.collate` does and adds
the references and each view's token types. When the teacher renders samples differently
(another resolution, template or tokenizer), it gets its own tokens; otherwise it reads the
student's.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

from kdlib.batch import BatchImages, MicroBatch, TokenBatch, VisionInputs
from kdlib.cache.fingerprint import sample_key
from kdlib.config.schema import BadImages, DataConfig
from kdlib.data.batching import collate
from kdlib.data.encoding import EncodedChat
from kdlib.data.formats import detect_format
from kdlib.data.images import BadImageError, ImageRef, image_digest, open_image
from kdlib.data.multimodal import VisionConversation, data_root, row_to_vision_conversation
from kdlib.data.samples import FilterReport, Prompt, Sample, Sequence, _fit, _match_teacher, load_split, rollout_sample
from kdlib.data.sources import RowSource
from kdlib.data.vision_encoding import VisionChatEncoder, VisionEncoding
from kdlib.data.vision_inputs import ImageLayout


@dataclass
class VisionSequence(Sequence):
    """One model's token ids for a sample, with its per-token modality ids when it takes them."""

    token_types: Optional[list[int]] = None


@dataclass
class VisionSample(Sample):
    """A training or evaluation example with images (``student``/``teacher`` are VisionSequences)."""

    images: list[ImageRef] = field(default_factory=list)
    # Content digests of the images (kdlib.data.images.image_digest), in order.
    image_digests: list[str] = field(default_factory=list)
    # '<key>: <file>, row <n>' for errors when the images are opened again in a worker.
    where: str = ""

    def teacher_key(self) -> str:
        """The teacher view's token ids and span, and the pixels of the images it reads."""
        view = self.teacher_view
        return sample_key(view.input_ids, view.response_start, self.image_digests)


@dataclass
class VisionPrompt(Prompt):
    """An on-policy prompt with its images: the student's tokens and token types, and the teacher's
    own when it renders differently (``conversation`` holds plain messages for the rollout log)."""

    images: list[ImageRef] = field(default_factory=list)
    image_digests: list[str] = field(default_factory=list)
    where: str = ""
    student_types: Optional[list[int]] = None
    teacher_types: Optional[list[int]] = None


@dataclass
class _Row:
    index: int
    where: str
    conversation: VisionConversation
    images: list  # opened (PIL)


def _rows(source: RowSource, cfg: DataConfig, report: FilterReport):
    """The rows of ``source`` with their images opened; rows with bad images stop the run, or are
    dropped and counted (``data.bad_images=drop``). Image columns of a ``datasets`` dataset are
    read undecoded, so a sample keeps the image's encoded bytes (JPEG, PNG), which is what travels
    to the workers, instead of a decoded picture."""
    fmt = detect_format(list(source.rows.column_names), cfg, f"{source.key}: {source.name}")
    base_dir = data_root(source.name)
    rows = source.rows
    undecoded = _undecoded(rows.features)
    if undecoded != rows.features:
        rows = rows.cast(undecoded)
    for index, raw in enumerate(rows):
        where = f"{source.key}: {source.where(index)}"
        try:
            conversation = row_to_vision_conversation(raw, fmt, cfg, base_dir, where)
            images = [open_image(ref, where, cfg.max_image_pixels) for ref in conversation.images]
        except BadImageError as exc:
            if cfg.bad_images is BadImages.error:
                raise
            report.dropped[exc.reason] += 1
            continue
        yield _Row(index, where, conversation, images)


def _undecoded(feature):
    """``feature`` (a dataset's features, or one of them) with every Image read as encoded bytes."""
    from datasets import Features, Image, List, Sequence

    if isinstance(feature, Image):
        return Image(decode=False) if feature.decode else feature
    if isinstance(feature, (Features, dict)):
        items = {name: _undecoded(value) for name, value in feature.items()}
        return Features(items) if isinstance(feature, Features) else items
    if isinstance(feature, List):
        return List(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, Sequence):
        return Sequence(_undecoded(feature.feature), length=feature.length)
    if isinstance(feature, list):
        return [_undecoded(value) for value in feature]
    return feature


def build_vision_samples(
    cfg: DataConfig, split: str, student: VisionChatEncoder, teacher: Optional[VisionChatEncoder] = None
) -> tuple[list[VisionSample], FilterReport]:
    """Samples of ``split`` ("train" or "eval") and the report of what was filtered.

    ``teacher`` is given only when the teacher renders samples differently from the student.
    """
    source = load_split(cfg, split)
    report = FilterReport.of(source)
    samples = []
    for row in _rows(source, cfg, report):
        encoded = student.encode(row.conversation, row.images, row.where)
        if encoded is None:
            report.dropped["empty response"] += 1
            continue
        student_seq, reason, truncated = _fit_vision(encoded, cfg)
        if student_seq is None:
            report.dropped[reason] += 1
            continue
        teacher_seq = None
        if teacher is not None:
            teacher_seq = _match_vision_teacher(teacher.encode(row.conversation, row.images, row.where), student_seq)
            if teacher_seq is None:
                report.dropped["teacher tokenises the response differently"] += 1
                continue
        report.kept += 1
        report.truncated += int(truncated)
        samples.append(VisionSample(
            row.index, student_seq, teacher_seq, images=row.conversation.images,
            image_digests=[image_digest(image) for image in row.images], where=row.where,
        ))
    return samples, report


def build_vision_prompts(
    cfg: DataConfig, student: VisionChatEncoder, teacher: Optional[VisionChatEncoder] = None
) -> tuple[list[VisionPrompt], FilterReport]:
    """Prompts of data.train with their images (a trailing assistant turn is dropped: the student
    writes its own answer about the images)."""
    source = load_split(cfg, "train")
    report = FilterReport.of(source)
    prompts = []
    for row in _rows(source, cfg, report):
        prompt = row.conversation.without_response()
        ours = student.encode_prompt(prompt, row.images, row.where)
        theirs = teacher.encode_prompt(prompt, row.images, row.where) if teacher is not None else None
        if max(len(ours.input_ids), len(theirs.input_ids) if theirs else 0) >= cfg.max_len:
            report.dropped[f"prompt longer than data.max_len={cfg.max_len}"] += 1
            continue
        report.kept += 1
        prompts.append(VisionPrompt(
            row.index, ours.input_ids, None if theirs is None else theirs.input_ids,
            prompt.text_messages(cfg.image_placeholder), images=prompt.images,
            image_digests=[image_digest(image) for image in row.images[: len(prompt.images)]], where=row.where,
            student_types=ours.token_types, teacher_types=None if theirs is None else theirs.token_types,
        ))
    return prompts, report


def vision_rollout_sample(prompt: VisionPrompt, response_ids: list[int], max_len: int) -> tuple[VisionSample, bool]:
    """:func:`kdlib.data.samples.rollout_sample` for a prompt with images: the same images, the
    token types extended with text (0) over the sampled response."""
    sample, cut = rollout_sample(prompt, response_ids, max_len)

    def typed(sequence: Optional[Sequence], types: Optional[list[int]]) -> Optional[VisionSequence]:
        if sequence is None:
            return None
        extended = None if types is None else types + [0] * (len(sequence) - len(types))
        return VisionSequence(sequence.input_ids, sequence.response_start, extended)

    out = VisionSample(
        sample.index, typed(sample.student, prompt.student_types), typed(sample.teacher, prompt.teacher_types),
        cacheable=False, images=prompt.images, image_digests=prompt.image_digests, where=prompt.where,
    )
    return out, cut


def collate_vision(
    samples: list[VisionSample],
    student: VisionChatEncoder,
    teacher: Optional[VisionChatEncoder] = None,
    *,
    max_pixels: Optional[int] = None,
) -> MicroBatch:
    """Right-padded token views (as :func:`kdlib.data.batching.collate`) with the samples' image
    references and each view's token types; the pixels are laid out later, by each worker
    (:meth:`~kdlib.data.vision_inputs.ImageLayout.attach`). ``teacher``: the teacher's encoder
    when the samples carry teacher sequences; ``max_pixels``: ``data.max_image_pixels``."""
    batch = collate(samples, student_pad_id=student.pad_id, teacher_pad_id=None if teacher is None else teacher.pad_id)
    images = None
    if any(sample.images for sample in samples):
        images = BatchImages([list(s.images) for s in samples], [s.where for s in samples], max_pixels)
    out = replace(batch, student=_view(batch.student, student, [s.student for s in samples], images))
    if batch.teacher is not None:
        assert teacher is not None, "teacher sequences need the teacher's image layout"
        out.teacher = _view(batch.teacher, teacher, [s.teacher for s in samples], images)
    return out


def _view(tokens: TokenBatch, layout: ImageLayout, sequences: list, images: Optional[BatchImages]) -> TokenBatch:
    types = layout.pad_token_types([s.token_types for s in sequences], tokens.input_ids.shape[1])
    vision = None if types is None else VisionInputs(token_types=types, token_types_key=layout.token_types_key)
    return replace(tokens, images=images, vision=vision)


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
