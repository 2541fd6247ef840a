"""The algorithm contract and registry: what a student worker computes for one micro-batch.

An algorithm turns a micro-batch, the teacher's output for it and the student model into the
step's :class:`~kdlib.losses.LossTerms`. The part every hidden-state algorithm shares (student
forward to the final hidden states at the loss positions, next-token targets, the student head) is
:meth:`Algorithm.student_forward`, written once here. Users add algorithms with
``@kdlib.register_algorithm("name", config=MyConfig)`` and select them with ``algorithm=name``.

Cross-tokenizer algorithms (``needs_alignment``) say which teacher rows they read
(:meth:`Algorithm.teacher_row_kind`), build their parts once the student exists
(:meth:`Algorithm.attach`) and may own trainable modules (:meth:`Algorithm.modules`: DSKD's
projectors), which the student worker trains, checkpoints and never exports.
"""

from __future__ import annotations

from abc import ABC
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Optional

import torch
from torch import nn

from kdlib.batch import MicroBatch
from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import AlgorithmConfig, LossConfig
from kdlib.losses import LossTerms
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of
from kdlib.registry import Registry

if TYPE_CHECKING:
    from kdlib.xtok.groups import RowKind
    from kdlib.xtok.vocab import VocabMatch

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
    # Whether it compares the models across tokenizers: its micro-batches then carry the
    # byte-offset alignment of the two tokenisations, and the tokenizers may differ.
    needs_alignment: ClassVar[bool] = False
    # The teacher signals (teacher.signal.kind) it can learn from; composition refuses others.
    signals: ClassVar[tuple[str, ...]] = ("hidden",)
    # Whether its loss has a policy-gradient term (kdlib.algorithms.reward), logged as pg_loss.
    policy_gradient_term: ClassVar[bool] = False

    def __init__(self, cfg: AlgorithmConfig, loss: LossConfig, teacher_head: Optional[LMHead]) -> None:
        # the head comes with hidden states; an algorithm that also takes sparse signals may get none
        if self.needs_teacher and teacher_head is None and self.signals == ("hidden",):
            raise ValueError(f"algorithm {cfg.name!r} needs the teacher's head")
        self.cfg = cfg
        self.loss_cfg = loss
        self.teacher_head = teacher_head

    @classmethod
    def teacher_row_kind(cls, cfg: AlgorithmConfig) -> Optional["RowKind"]:
        """The teacher rows of the alignment groups this algorithm reads (None: every loss row)."""
        return None

    def attach(self, student: nn.Module, vocab_match: Optional["VocabMatch"]) -> None:
        """Called once by the student worker with the built student (before sharding) and, for
        cross-tokenizer algorithms, the matched vocabulary of the two tokenizers: the place to
        build what depends on them. Nothing by default."""

    def modules(self) -> dict[str, nn.Module]:
        """Trainable modules of the algorithm itself, by name (none by default; DSKD's
        projectors): trained with the student, saved in its checkpoints, never exported."""
        return {}

    def modules_lr(self) -> Optional[float]:
        """Learning rate of :meth:`modules`' parameters (None: train.lr)."""
        return None

    def compute_loss(
        self, student: nn.Module, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        """Loss terms of ``batch``; ``loss`` is already divided by ``normaliser``. By default the
        student's forward (:meth:`student_forward`) and :meth:`loss_of`; an algorithm overrides
        one of the two."""
        return self.loss_of(self.student_forward(student, batch), batch, teacher, normaliser)

    def loss_of(
        self, forward: StudentForward, batch: MicroBatch, teacher: Optional[TeacherOutput], normaliser: float
    ) -> LossTerms:
        """Loss terms of ``batch`` given the student's forward over it. Algorithms that implement
        this (every built-in one) let a run with several teachers put samples of different teachers
        in one micro-batch (one student forward, each teacher's loss on its own rows)."""
        # reached only by calling it on an algorithm that computes its loss in compute_loss alone
        # (a plugin's); such an algorithm is never given a shared forward (see shares_forward)
        raise TypeError(f"algorithm {self.cfg.name!r} computes its loss in compute_loss only, not from a given forward")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.compute_loss is Algorithm.compute_loss and not cls.shares_forward():
            raise TypeError(f"algorithm class {cls.__name__} must override loss_of or compute_loss")

    @classmethod
    def shares_forward(cls) -> bool:
        """Whether the algorithm computes its loss from a given student forward (:meth:`loss_of`)."""
        return cls.loss_of is not Algorithm.loss_of

    @staticmethod
    def student_forward(student: nn.Module, batch: MicroBatch) -> StudentForward:
        return StudentForward(
            hidden=hidden_at_loss_positions(student, batch.student),
            head=lm_head_of(student),
            targets=batch.student.targets(),
        )


def register_algorithm(name: str, *, config: type[AlgorithmConfig] = AlgorithmConfig) -> Callable:
    """Class decorator registering an :class:`Algorithm` subclass under ``name``."""
    return ALGORITHMS.class_decorator(name, Algorithm, config, AlgorithmConfig, "kdlib.algorithms")
