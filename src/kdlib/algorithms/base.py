"""The algorithm contract and registry: what a student worker computes for one micro-batch.

An algorithm turns a micro-batch, the teacher's output for it and the student model into the
step's :class:`~kdlib.losses.LossTerms`. The part every hidden-state algorithm shares (student
forward to the final hidden states at the loss positions, next-token targets, the student head) is
:meth:`Algorithm.student_forward`, written once here. Users add algorithms with
``@kdlib.register_algorithm("name", config=MyConfig)`` and select them with ``algorithm=name``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

import torch
from torch import nn

from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import AlgorithmConfig, LossConfig
from kdlib.losses import LossTerms
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of
from kdlib.registry import Registry

ALGORITHMS: Registry[type["Algorithm"]] = Registry("algorithm")


@dataclass
class StudentForward:
    """The student's side of a micro-batch, ready for a loss."""

    hidden: torch.Tensor  # [n_loss_tokens, hidden], with autograd
    head: LMHead  # the student's own head (parameters with autograd)
    targets: torch.Tensor  # [n_loss_tokens] next-token ids


class Algorithm(ABC):
    """Computes a micro-batch's loss inside a student worker."""

    # Whether the controller must run a teacher for this algorithm.
    needs_teacher: ClassVar[bool] = True

    def __init__(self, cfg: AlgorithmConfig, loss: LossConfig, teacher_head: Optional[LMHead]) -> None:
        if self.needs_teacher and teacher_head is None:
            raise ValueError(f"algorithm {cfg.name!r} needs the teacher's head")
        self.cfg = cfg
        self.loss_cfg = loss
        self.teacher_head = teacher_head

    @abstractmethod
    def compute_loss(
        self, student: nn.Module, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        """Loss terms of ``batch``; ``loss`` is already divided by ``normaliser``."""

    @staticmethod
    def student_forward(student: nn.Module, batch: MicroBatch) -> StudentForward:
        return StudentForward(
            hidden=hidden_at_loss_positions(student, batch.student),
            head=lm_head_of(student),
            targets=batch.student.targets(),
        )


def register_algorithm(name: str, *, config: type[AlgorithmConfig] = AlgorithmConfig) -> Callable:
    """Class decorator registering an :class:`Algorithm` subclass under ``name``."""

    def decorate(cls: type[Algorithm]) -> type[Algorithm]:
        if not (isinstance(cls, type) and issubclass(cls, Algorithm)):
            raise TypeError(f"algorithm {name!r} must subclass kdlib.algorithms.Algorithm")
        if not issubclass(config, AlgorithmConfig):
            raise TypeError(f"algorithm {name!r}: config must subclass kdlib.config.AlgorithmConfig")
        ALGORITHMS.register(name, cls, config=config)
        return cls

    return decorate
