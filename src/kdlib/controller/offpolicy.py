"""Off-policy distillation and supervised fine-tuning: train on a fixed dataset's responses.

The global batches are data.train's samples in a seeded order; everything else (planning, teacher,
students, checkpoints, evaluation) is the shared :class:`~kdlib.controller.training.TrainingLoop`.
``mode=sft`` is the same loop without a teacher: cross-entropy on the dataset's responses (with
``+recipe=generate`` first, sequence-level KD).
"""

from __future__ import annotations

from typing import Any, Iterator

from kdlib.algorithms import ALGORITHMS
from kdlib.config.schema import KDConfig
from kdlib.controller.mode import Needs, TeacherNeed
from kdlib.controller.training import TrainingLoop
from kdlib.data.samples import Sample
from kdlib.errors import ConfigError


class OffPolicyMode(TrainingLoop):
    @classmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        teacher = TeacherNeed.uncached if ALGORITHMS.get(cfg.algorithm.name).needs_teacher else TeacherNeed.none
        return Needs(responses=True, teacher=teacher, students=True)

    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        return self.dataset_batches(skip)


class SFTMode(OffPolicyMode):
    @classmethod
    def resolve(cls, cfg: KDConfig, record: Any) -> None:
        if cfg.algorithm.name == "vanilla":  # the default algorithm: SFT trains with its own
            cfg.algorithm = ALGORITHMS.entry("sft").config_cls()
            record("algorithm", "sft", "mode=sft trains with cross-entropy only")

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        super().check(cfg)
        if ALGORITHMS.get(cfg.algorithm.name).needs_teacher:
            raise ConfigError(
                f"mode=sft trains without a teacher, but algorithm={cfg.algorithm.name} needs one; "
                "use algorithm=sft (or +recipe=sft) or mode=offpolicy"
            )

    def progress_fields(self, metrics: dict[str, Any]) -> dict[str, float]:
        return {"loss": metrics["loss"]}
