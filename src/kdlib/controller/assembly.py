"""How each part of a run is built: encoders, data, the teacher cache, worker groups, the head.

:meth:`kdlib.pipeline.Pipeline.build` calls these in an order that fails fast: tokenizers and data
first (a bad file or row is reported before any model loads), then the launcher and the worker
groups, then the head handshake (the teacher's ``lm_head`` goes to every student). Each function
takes the (frozen) config and what it builds from, and returns what it built; nothing here knows
which mode is running. Worker specs are built by keyword with only what each worker needs.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, Optional

from kdlib.config.schema import KDConfig, ModelConfig, TeacherConfig
from kdlib.config.teachers import config_key, named_teachers
from kdlib.controller import modality
from kdlib.data.batching import steps_per_epoch
from kdlib.data.bundle import DataBundle
from kdlib.data.encoding import ChatEncoder
from kdlib.errors import ConfigError
from kdlib.launch import Launcher
from kdlib.models.loading import load_tokenizer
from kdlib.progress import phase
from kdlib.workers.groups import RolloutGroup, StudentGroup, TeacherGroup
from kdlib.workers.rollout import RolloutWorker
from kdlib.workers.student import StudentWorker
from kdlib.workers.teacher import TeacherWorker
from kdlib.workers.specs import RolloutSpec, StudentSpec, TeacherSpec

if TYPE_CHECKING:
    from kdlib.cache.store import TeacherCache

log = logging.getLogger(__name__)


def chat_encoders(cfg: KDConfig, *, with_teacher: bool) -> tuple[ChatEncoder, Optional[ChatEncoder]]:
    """(student encoder, teacher encoder or None when the teacher reads the student's tokens);
    vision-language models get their processors' encoders (see controller/modality.py)."""
    vision = modality.vision_run(cfg, with_teacher=with_teacher)
    if vision:
        student, teacher = modality.vision_encoders(cfg, with_teacher=with_teacher)
        if teacher is not None:
            check_vocabularies(teacher, student)
        same = teacher is None or teacher.signature() == student.signature()
        return student, None if same else teacher  # same tokens and pixels: the student's view
    student_tok = load_tokenizer(cfg.student)
    student = ChatEncoder(student_tok, apply_chat_template=cfg.data.apply_chat_template, name="student")
    if not with_teacher:
        return student, None
    return student, teacher_encoder(cfg, cfg.teacher, student, privileged=bool(cfg.data.teacher_input_key))


def teacher_encoder(cfg: KDConfig, teacher_cfg: TeacherConfig, student: ChatEncoder, *, privileged: bool,
                    name: str = "teacher") -> Optional[ChatEncoder]:
    """The encoder of a text teacher, or None when it reads exactly the student's tokens (same
    tokenizer and template, no privileged prompt); ``name`` is its config key, for messages."""
    tokenizer = student.tokenizer if teacher_cfg.from_student else load_tokenizer(teacher_cfg)
    teacher = ChatEncoder(tokenizer, apply_chat_template=cfg.data.apply_chat_template, name=name)
    if not cross_tokenizer(cfg):
        check_vocabularies(teacher, student)
    if teacher.signature() == student.signature() and not privileged:
        return None  # same tokens: the teacher reads the student's batch
    return teacher


def cross_tokenizer(cfg: KDConfig) -> bool:
    """Whether the run's algorithm distils across tokenizers (its batches carry alignments)."""
    from kdlib.algorithms import ALGORITHMS

    return ALGORITHMS.get(cfg.algorithm.name).needs_alignment


def check_vocabularies(teacher: ChatEncoder, student: ChatEncoder) -> None:
    """Token-level KD compares distributions over the same token ids."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        from kdlib.algorithms import ALGORITHMS

        shared = len(set(t_vocab.items()) & set(s_vocab.items()))
        across = [entry.name for entry in ALGORITHMS if getattr(entry.load(), "needs_alignment", False)]
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, "
            f"{shared} identical); token-level KD needs one vocabulary: choose a cross-tokenizer "
            f"algorithm ({', '.join(f'algorithm={name}' for name in across)})"
        )


def load_data(
    cfg: KDConfig, student: ChatEncoder, teacher: Optional[ChatEncoder], *, prompts: bool = False, responses: bool = True
) -> DataBundle:
    """The samples a training mode needs: data.train's responses and/or prompts, and data.eval.

    For a cross-tokenizer algorithm every sample carries the alignment of its two responses (all
    1:1 groups when the tokenizers are the same) and training batches name the teacher rows the
    algorithm reads."""
    bundle = modality.new_bundle(cfg, student, teacher)
    if cross_tokenizer(cfg):
        from kdlib.algorithms import ALGORITHMS

        bundle.aligner = response_aligner(cfg, student, teacher, cfg.teacher)
        bundle.row_kind = ALGORITHMS.get(cfg.algorithm.name).teacher_row_kind(cfg.algorithm)
    return fill_bundle(cfg, bundle, prompts=prompts, responses=responses)


def response_aligner(cfg: KDConfig, student: ChatEncoder, teacher: Optional[ChatEncoder], teacher_cfg: TeacherConfig,
                     name: str = "teacher") -> Any:
    """The byte-offset aligner of the student's and a teacher's tokenisations (``teacher`` None:
    it reads the student's tokens, every group 1:1)."""
    from kdlib.data.cross_tokenizer import ResponseAligner

    return ResponseAligner(
        student, teacher or student, student_model=f"student ({cfg.student.tokenizer or cfg.student.model})",
        teacher_model=f"{name} ({teacher_cfg.tokenizer or teacher_cfg.model})",
    )


def fill_bundle(cfg: KDConfig, bundle: DataBundle, *, prompts: bool, responses: bool) -> DataBundle:
    """Load into ``bundle`` the prompts and/or data.train's samples, and data.eval's, with the
    reports of what was filtered."""
    if prompts:
        bundle.prompts, report = bundle.load_prompts(cfg.data)
        bundle.reports["prompts"] = report
        log.info("prompts: %s", report.summary())
        if not bundle.prompts:
            raise ConfigError(f"data.train: no usable prompt ({report.summary()})")
    if responses:
        bundle.train, report = bundle.load_samples(cfg.data, "train")
        bundle.reports["train"] = report
        log.info("train data: %s", report.summary())
        if not bundle.train:
            raise ConfigError(f"data.train: no usable sample in {report.source} ({report.summary()})")
    if cfg.data.eval:
        bundle.eval, report = bundle.load_samples(cfg.data, "eval")
        bundle.reports["eval"] = report
        log.info("eval data: %s", report.summary())
    return bundle


def total_steps(cfg: KDConfig, n_items: int, items_per_step: int, what: str = "samples") -> int:
    """Optimizer steps: an explicit ``train.max_steps`` decides (epochs cycle as needed, as in
    transformers' Trainer); otherwise ``train.epochs`` passes over the ``n_items``."""
    per_epoch = steps_per_epoch(n_items, items_per_step)
    if cfg.train.max_steps > 0:
        if cfg.train.max_steps > per_epoch * cfg.train.epochs:
            log.info("train.max_steps=%d: %.1f passes over %d %s (%d steps each)",
                     cfg.train.max_steps, cfg.train.max_steps / per_epoch, n_items, what, per_epoch)
        return cfg.train.max_steps
    return per_epoch * cfg.train.epochs


def open_teacher_cache(cfg: KDConfig, teacher_encoder: ChatEncoder, teacher: Optional[TeacherConfig] = None) -> "TeacherCache":
    """Open ``teacher.cache`` for this run's teacher setup (refused if it holds another's);
    ``teacher_encoder`` renders the teacher's view (its tokenizer, or its processor for a VLM);
    ``teacher``: a named teacher's config (default: the run's teacher)."""
    teacher = teacher or cfg.teacher
    from kdlib.cache.fingerprint import (
        FORMAT, CacheNamespace, processor_fingerprint, tokenizer_fingerprint, weights_fingerprint,
    )
    from kdlib.cache.store import TeacherCache
    from kdlib.hardware import resolve_device_type
    from kdlib.models.loading import model_location

    processor = getattr(teacher_encoder, "processor", None)
    rendering = (
        tokenizer_fingerprint(teacher_encoder.tokenizer, apply_chat_template=cfg.data.apply_chat_template)
        if processor is None else processor_fingerprint(processor, apply_chat_template=cfg.data.apply_chat_template)
    )
    namespace = CacheNamespace(
        format=FORMAT,
        weights=weights_fingerprint(model_location(teacher.model)),
        teacher_model=teacher.model,
        dtype=teacher.dtype.value,
        backend=teacher.backend.name,
        attn_implementation=teacher.attn_implementation,
        device_type=resolve_device_type(cfg.device),
        tokenizer=rendering,
        wire_dtype=cfg.transport.dtype.value,
        signal=teacher.signal.describe(),
    )
    return TeacherCache.open(teacher.cache, namespace)


def uncached_samples(cache: "TeacherCache", data: DataBundle) -> int:
    """Samples of data.train and data.eval whose teacher outputs are not in the cache (entries
    present are read and checksummed first: a damaged one counts as missing, never trusted)."""
    keys = [s.teacher_key() for s in [*data.train, *data.eval]]
    return len(cache.verified_missing(keys))


def start_teacher(cfg: KDConfig, launcher: Launcher, cache: Optional["TeacherCache"], name: str = "teacher") -> TeacherGroup:
    """``teacher.num_workers`` teacher workers (self-distillation: built like the student); with a
    teacher cache they write what they compute into it. ``name``: a named teacher (``teachers.<name>``)."""
    teacher = named_teachers(cfg)[name]
    specs = [
        TeacherSpec(
            teacher=teacher, transport=cfg.transport, device=cfg.device, rank=rank,
            architecture=cfg.student if teacher.from_student else None,
            cache=cache.namespace if cache is not None else None, chunk_size=cfg.loss.chunk_size,
        )
        for rank in range(teacher.num_workers)
    ]
    role = config_key(name)
    with _loading(cfg, role, len(specs)):
        return TeacherGroup(launcher.group(role, TeacherWorker, specs))


def start_rollout(cfg: KDConfig, launcher: Launcher, model: ModelConfig, *, syncs_weights: bool) -> RolloutGroup:
    """``rollout.num_workers`` generation engines running ``model`` (a transport when they take
    the student's weights)."""
    if syncs_weights:
        modality.check_rollout(cfg, model, "student")
    else:
        modality.require_text_model(model, "teacher", "mode=generate")
    specs = [
        RolloutSpec(model=model, rollout=cfg.rollout, device=cfg.device, rank=rank,
                    transport=cfg.transport if syncs_weights else None, logprobs=syncs_weights)
        for rank in range(cfg.rollout.num_workers)
    ]
    with _loading(cfg, "rollout engine", len(specs)):
        return RolloutGroup(launcher.group("rollout", RolloutWorker, specs))


def start_students(cfg: KDConfig, launcher: Launcher, data: DataBundle, steps: int, teacher_head: Any,
                   teachers: Any = None) -> StudentGroup:
    """The data-parallel student workers, set up with the teacher's head (None: no teacher) and,
    across tokenizers, the matched vocabulary (computed once here); with several teachers, what
    they get of each (``teachers``: name -> TeacherSide)."""
    world = cfg.student.num_workers
    match = None if data.aligner is None else data.aligner.vocab_match()
    specs = [
        StudentSpec(
            student=cfg.student, algorithm=cfg.algorithm, loss=cfg.loss, train=cfg.train, transport=cfg.transport,
            device=cfg.device, seed=cfg.seed, plugins=tuple(cfg.plugins), teacher_cache=cfg.teacher.cache,
            rank=rank, world_size=world, rollout_temperature=cfg.rollout.temperature or 1.0,
        )
        for rank in range(world)
    ]
    with _loading(cfg, "student", world):
        students = StudentGroup(launcher.group("student", StudentWorker, specs, distributed=True))
        students.setup(teacher_head, steps, match, teachers)
    return students


def teacher_head(cfg: KDConfig, teacher: Optional[TeacherGroup], cache: Optional["TeacherCache"]) -> Any:
    """The teacher's LM head, shipped to every student: from a teacher worker, or read from the
    checkpoint files when the cache serves every output (None without a teacher, and with a
    top-k or sampled signal, which carries the teacher's log-probabilities themselves)."""
    if cfg.teacher.signal.sparse:
        return None
    if teacher is not None:
        return teacher.lm_head()
    if cache is not None:
        from kdlib.models.checkpoint_head import load_lm_head

        return load_lm_head(cfg.teacher)
    return None


def _loading(cfg: KDConfig, role: str, n_workers: int):
    """The progress of building a worker group (its models load inside the workers)."""
    workers = f" ({n_workers} workers)" if n_workers > 1 else ""
    return phase(f"loading the {role}{workers}", enabled=cfg.logging.progress)
