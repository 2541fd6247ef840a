"""Pipeline.from_config: the one place that turns a config into data, workers and a loop.

Building happens in an order that fails fast: tokenizers and data first (a bad file or row is
reported before any model loads), then the launcher and the worker groups (teacher, student or
rollout, as the mode needs), then the head handshake (the teacher's ``lm_head`` goes to every
student). The controller loops receive a built pipeline and only drive it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from kdlib.algorithms import ALGORITHMS
from kdlib.batch import MicroBatch
from kdlib.config.schema import KDConfig, Mode
from kdlib.data.batching import collate, steps_per_epoch
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import FilterReport, Prompt, Sample, build_prompts, build_samples
from kdlib.errors import ConfigError
from kdlib.launch import Launcher, WorkerGroup, build_launcher
from kdlib.models.loading import load_tokenizer

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What ``kdlib.run`` returns."""

    run_dir: Path
    # Metrics of the last logged step (loss, kd_loss, ce_loss, lr, grad_norm, tokens_per_s, ...).
    metrics: dict[str, float] = field(default_factory=dict)
    # Held-out metrics before and after training (kl, ce, top1_agreement, tokens).
    eval_before: Optional[dict[str, float]] = None
    eval_after: Optional[dict[str, float]] = None
    # The final student in Hugging Face format.
    student_dir: Optional[Path] = None
    # Other files the run produced, by name (e.g. "generated" for mode=generate).
    outputs: dict[str, Path] = field(default_factory=dict)


@dataclass
class DataBundle:
    """Tokenised samples and what it takes to batch them."""

    train: list[Sample]
    eval: list[Sample]
    reports: dict[str, FilterReport]
    student_pad_id: int
    teacher_pad_id: Optional[int]
    # mode=onpolicy: the prompts the student answers, and the student's chat encoder (end tokens)
    prompts: list[Prompt] = field(default_factory=list)
    student_encoder: Optional[ChatEncoder] = None

    def collate(self, samples: list[Sample], *, packing: bool = False) -> MicroBatch:
        return collate(
            samples, student_pad_id=self.student_pad_id, teacher_pad_id=self.teacher_pad_id, packing=packing
        )


@dataclass
class Pipeline:
    cfg: KDConfig
    run_dir: Path
    launcher: Launcher
    student_tokenizer: Any = None
    data: Optional[DataBundle] = None
    teacher: Optional[WorkerGroup] = None
    student: Optional[WorkerGroup] = None
    rollout: Optional[WorkerGroup] = None
    total_steps: int = 0

    @classmethod
    def from_config(cls, cfg: KDConfig, run_dir: Path) -> "Pipeline":
        if cfg.mode is Mode.generate:
            return cls._for_generation(cfg, run_dir)
        return cls._for_training(cfg, run_dir)

    @classmethod
    def _for_training(cls, cfg: KDConfig, run_dir: Path) -> "Pipeline":
        from kdlib.workers.rollout import RolloutWorker
        from kdlib.workers.student import StudentWorker
        from kdlib.workers.teacher import TeacherWorker

        needs_teacher = ALGORITHMS.get(cfg.algorithm.name).needs_teacher
        student_tok = load_tokenizer(cfg.student)
        student_enc = ChatEncoder(student_tok, apply_chat_template=cfg.data.apply_chat_template, name="student")
        teacher_enc = None
        if needs_teacher:
            teacher_tok = student_tok if cfg.teacher.from_student else load_tokenizer(cfg.teacher)
            teacher_enc = ChatEncoder(teacher_tok, apply_chat_template=cfg.data.apply_chat_template, name="teacher")
            _check_vocabularies(teacher_enc, student_enc)
            if teacher_enc.signature() == student_enc.signature() and not cfg.data.teacher_input_key:
                teacher_enc = None  # same tokens: the teacher reads the student's batch
        data = _load_data(cfg, student_enc, teacher_enc)
        total = _total_steps(cfg, len(data.prompts) if cfg.mode is Mode.onpolicy else len(data.train))

        launcher = build_launcher(cfg.launcher)
        pipeline = cls(cfg=cfg, run_dir=run_dir, launcher=launcher, student_tokenizer=student_tok, data=data, total_steps=total)
        try:
            if needs_teacher:
                architecture = cfg.student if cfg.teacher.from_student else None
                pipeline.teacher = launcher.group(
                    "teacher", TeacherWorker,
                    [(cfg.teacher, cfg.transport, cfg.device, rank, architecture) for rank in range(cfg.teacher.num_workers)],
                )
            if cfg.mode is Mode.onpolicy:
                pipeline.rollout = launcher.group(
                    "rollout", RolloutWorker,
                    [(cfg.student, cfg.rollout, cfg.device, rank, cfg.transport) for rank in range(cfg.rollout.num_workers)],
                )
            world = cfg.student.num_workers
            pipeline.student = launcher.group(
                "student", StudentWorker, [(cfg, rank, world) for rank in range(world)], distributed=True
            )
            head = pipeline.teacher.call("lm_head")[0] if pipeline.teacher is not None else None
            pipeline.student.call("setup", head, total)
        except BaseException:
            launcher.shutdown()
            raise
        return pipeline

    @classmethod
    def _for_generation(cls, cfg: KDConfig, run_dir: Path) -> "Pipeline":
        from kdlib.workers.rollout import RolloutWorker

        tokenizer = load_tokenizer(cfg.teacher)
        launcher = build_launcher(cfg.launcher)
        pipeline = cls(cfg=cfg, run_dir=run_dir, launcher=launcher, student_tokenizer=tokenizer)
        try:
            pipeline.rollout = launcher.group(
                "rollout", RolloutWorker, [(cfg.teacher, cfg.rollout, cfg.device, 0)]
            )
        except BaseException:
            launcher.shutdown()
            raise
        return pipeline

    def run(self) -> RunResult:
        from kdlib.controller import LOOPS

        return LOOPS[self.cfg.mode](self).run()

    def close(self) -> None:
        self.launcher.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _load_data(cfg: KDConfig, student: ChatEncoder, teacher: Optional[ChatEncoder]) -> DataBundle:
    reports: dict[str, FilterReport] = {}
    prompts: list[Prompt] = []
    train: list[Sample] = []
    if cfg.mode is Mode.onpolicy:
        prompts, reports["prompts"] = build_prompts(cfg.data, student, teacher)
        log.info("prompts: %s", reports["prompts"].summary())
        if not prompts:
            raise ConfigError(f"data.train: no usable prompt ({reports['prompts'].summary()})")
    if cfg.mode is not Mode.onpolicy or cfg.onpolicy.lmbda < 1.0:  # off-policy steps need responses
        train, reports["train"] = build_samples(cfg.data, "train", student, teacher)
        log.info("train data: %s", reports["train"].summary())
        if not train:
            raise ConfigError(f"data.train: no usable sample in {reports['train'].source} ({reports['train'].summary()})")
    evaluation: list[Sample] = []
    if cfg.data.eval:
        evaluation, eval_report = build_samples(cfg.data, "eval", student, teacher)
        log.info("eval data: %s", eval_report.summary())
        reports["eval"] = eval_report
    return DataBundle(
        train=train,
        eval=evaluation,
        reports=reports,
        student_pad_id=student.pad_id,
        teacher_pad_id=None if teacher is None else teacher.pad_id,
        prompts=prompts,
        student_encoder=student,
    )


def _total_steps(cfg: KDConfig, n_items: int) -> int:
    """Optimizer steps: epochs over the samples (on-policy: over the prompts), capped by max_steps."""
    per_step = cfg.train.global_batch_size
    if cfg.mode is Mode.onpolicy:
        per_step //= cfg.rollout.n_samples_per_prompt  # prompts per step
    total = steps_per_epoch(n_items, per_step) * cfg.train.epochs
    return min(total, cfg.train.max_steps) if cfg.train.max_steps > 0 else total


def _check_vocabularies(teacher: ChatEncoder, student: ChatEncoder) -> None:
    """Token-level KD compares distributions over the same token ids."""
    t_vocab, s_vocab = teacher.tokenizer.get_vocab(), student.tokenizer.get_vocab()
    if t_vocab != s_vocab:
        shared = len(set(t_vocab.items()) & set(s_vocab.items()))
        raise ConfigError(
            f"teacher and student tokenizers differ ({len(t_vocab)} vs {len(s_vocab)} tokens, "
            f"{shared} identical); token-level KD needs one vocabulary"
        )
