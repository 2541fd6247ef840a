"""Text or image+text: what a run's checkpoints are, and the encoders and data that follow from it.

Whether a role is a vision-language model (VLM) is read from its checkpoint's config (a vision
tower), never set by hand. A VLM student reads every sample through its processor
(:class:`~kdlib.data.vision_encoding.VisionChatEncoder`) and its data is a
:class:`~kdlib.data.vision_bundle.VisionDataBundle`; everything downstream (batching, workers,
transport, loss) follows from the bundle and the batches, so the modes never ask. Combinations kdlib
cannot run are one-line :class:`~kdlib.errors.ConfigError` s here, before any model loads.
"""

from __future__ import annotations

from typing import Optional

from kdlib.config.schema import KDConfig, ModelConfig
from kdlib.data.bundle import DataBundle
from kdlib.data.encoding import ChatEncoder
from kdlib.errors import ConfigError

def is_vision_language(cfg: ModelConfig) -> bool:
    """Whether ``cfg.model`` is a vision-language checkpoint."""
    from kdlib.models.vlm import checkpoint_is_vision_language

    return checkpoint_is_vision_language(cfg)


def vision_run(cfg: KDConfig, *, with_teacher: bool) -> bool:
    """Whether the run is image+text (its student is a VLM), after checking that the roles agree
    and that everything configured can read images."""
    student = is_vision_language(cfg.student)
    if with_teacher and not cfg.teacher.from_student and is_vision_language(cfg.teacher) != student:
        kinds = ("a vision-language model", "text-only")
        raise ConfigError(
            f"teacher.model={cfg.teacher.model} is {kinds[not is_vision_language(cfg.teacher)]} but "
            f"student.model={cfg.student.model} is {kinds[not student]}: hidden-state KD needs both to read "
            "the same inputs (distil a VLM into a VLM, a text model into a text model)"
        )
    if not student:
        return False
    if cfg.train.packing is True:
        raise ConfigError("train.packing=true is not supported for vision-language models; set train.packing=false")
    from kdlib.algorithms import ALGORITHMS

    if ALGORITHMS.get(cfg.algorithm.name).needs_alignment:
        raise ConfigError(f"algorithm={cfg.algorithm.name} (cross-tokenizer KD) is not supported for vision-language "
                          "models yet; distil a VLM with one tokenizer (algorithm=vanilla)")
    if cfg.data.teacher_input_key:
        raise ConfigError("data.teacher_input_key (privileged context) is not supported for vision-language models yet")
    if not cfg.data.apply_chat_template:
        raise ConfigError("data.apply_chat_template=false is not supported for vision-language models (their "
                          "processors place the images through the chat template)")
    if with_teacher and not _teacher_reads_images(cfg.teacher.backend.name):
        raise ConfigError(f"teacher/backend={cfg.teacher.backend.name} cannot score images; use teacher/backend=hf "
                          "for vision-language models")
    return True


def require_text_model(cfg: ModelConfig, role: str, what: str) -> None:
    """A ConfigError when ``what`` (a mode, a backend) cannot run ``role``'s VLM."""
    if is_vision_language(cfg):
        raise ConfigError(f"{what} does not support vision-language models yet ({role}.model={cfg.model})")


def check_rollout(cfg: KDConfig, model: ModelConfig, role: str) -> None:
    """A generation engine for ``model``: VLMs need a backend that generates about images."""
    from kdlib.backends import IMAGE_ROLLOUT_BACKENDS

    if cfg.rollout.backend not in IMAGE_ROLLOUT_BACKENDS and is_vision_language(model):
        raise ConfigError(f"rollout.backend={cfg.rollout.backend} cannot generate about images; use rollout.backend=hf "
                          f"for the vision-language {role} ({model.model})")


def _teacher_reads_images(backend: str) -> bool:
    from kdlib.backends import TEACHER_BACKENDS

    info = TEACHER_BACKENDS.entry(backend).info
    return bool(info is not None and info.images)


def vision_encoders(cfg: KDConfig, *, with_teacher: bool):
    """(student encoder, teacher encoder or None without a teacher) for a VLM run: each model's
    processor renders the samples."""
    from kdlib.data.vision_encoding import VisionChatEncoder
    from kdlib.models.vlm import load_processor

    student = VisionChatEncoder(load_processor(cfg.student), name="student")
    if not with_teacher:
        return student, None
    processor = student.processor if cfg.teacher.from_student else load_processor(cfg.teacher)
    return student, VisionChatEncoder(processor, name="teacher")


def new_bundle(cfg: KDConfig, student: ChatEncoder, teacher: Optional[ChatEncoder]) -> DataBundle:
    """An empty data bundle of the run's modality, set up with its encoders."""
    from kdlib.data.vision_encoding import VisionChatEncoder

    common = dict(
        student_pad_id=student.pad_id, teacher_pad_id=None if teacher is None else teacher.pad_id,
        student_encoder=student, teacher_encoder=teacher,
    )
    if isinstance(student, VisionChatEncoder):
        from kdlib.data.vision_bundle import VisionDataBundle

        return VisionDataBundle(**common, max_image_pixels=cfg.data.max_image_pixels)
    return DataBundle(**common)
