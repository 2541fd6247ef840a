"""Off-policy distillation and supervised fine-tuning: train on a fixed dataset's responses.

The global batches are data.train's samples in a seeded order; everything else (planning, teacher,
students, checkpoints, evaluation) is the shared :class:`~kdlib.controller.training.TrainingLoop`.
``mode=sft`` is the same loop without a teacher: cross-entropy on the dataset's responses (with
``+recipe=generate`` first, sequence-level KD).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Iterator

from kdlib.algorithms import ALGORITHMS
from kdlib.config.schema import KDConfig
from kdlib.controller import assembly
from kdlib.controller.training import TrainingLoop
from kdlib.data.samples import Sample
from kdlib.errors import ConfigError

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline

log = logging.getLogger(__name__)


class OffPolicyMode(TrainingLoop):
    @classmethod
    def build(cls, pipeline: "Pipeline") -> "OffPolicyMode":
        cfg = pipeline.cfg
        needs_teacher = ALGORITHMS.get(cfg.algorithm.name).needs_teacher
        student, teacher = assembly.chat_encoders(cfg, with_teacher=needs_teacher)
        pipeline.student_tokenizer = student.pretrained_files
        pipeline.data = assembly.load_data(cfg, student, teacher)
        pipeline.total_steps = assembly.total_steps(cfg, len(pipeline.data.train), cfg.train.global_batch_size)
        if needs_teacher and cfg.teacher.cache:
            assembly.open_teacher_cache(pipeline, teacher or student)
            missing = assembly.uncached_samples(pipeline)
            n_samples = len(pipeline.data.train) + len(pipeline.data.eval)
            if missing:
                log.info("teacher cache %s: %d of %d samples missing; the teacher computes and stores them",
                         cfg.teacher.cache, missing, n_samples)
            else:
                log.info("teacher cache %s covers all %d samples: no teacher model is loaded", cfg.teacher.cache, n_samples)
            needs_teacher = missing > 0
        assembly.start_launcher(pipeline)
        if needs_teacher:
            assembly.start_teacher(pipeline)
        assembly.start_students(pipeline, assembly.teacher_head(pipeline))
        return cls(pipeline)

    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        return self.dataset_batches(skip)


class SFTMode(OffPolicyMode):
    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        super().check(cfg)
        if ALGORITHMS.get(cfg.algorithm.name).needs_teacher:
            if cfg.algorithm.name != "vanilla":  # vanilla is the default: SFT replaces it
                raise ConfigError(
                    f"mode=sft trains without a teacher, but algorithm={cfg.algorithm.name} needs one; "
                    "use algorithm=sft (or +recipe=sft) or mode=offpolicy"
                )
            sft_config = ALGORITHMS.entry("sft").config_cls
            cfg.algorithm = sft_config()
            cfg.auto_choices["algorithm"] = "sft: mode=sft trains with cross-entropy only"
