"""The teacher backend contract: token batches in, a teacher output (hidden states at loss rows) out.

A backend wraps one inference engine (transformers now; SGLang on GPUs). It exposes the teacher's
language-model head, which the students use to turn hidden states back into logits, and scores
token batches. What else it can do is declared, not assumed: :class:`TeacherCapabilities` are
registered with the backend's name (``TEACHER_BACKENDS.register(..., info=TeacherCapabilities(...))``)
so a configuration that needs a capability the chosen backend lacks (colocation needs sleep/wake,
a self-distillation teacher needs weight loading) fails at composition, before anything loads.
A backend's typed options live at ``teacher.<backend name>`` when its entry has a config class.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import ClassVar, Optional

import torch

from kdlib.batch import TokenBatch
from kdlib.config.schema import ModelConfig, TeacherConfig
from kdlib.errors import ModelError
from kdlib.models.head import LMHead
from kdlib.registry import Registry
from kdlib.teacher_output import TeacherOutput


@dataclass(frozen=True)
class TeacherCapabilities:
    """What a teacher backend can do besides returning hidden states."""

    # Returns the engine's own top-k log-probabilities per scored row.
    topk_logprobs: bool = False
    # Can release its accelerator memory and take it back (pipeline.colocate).
    sleep_wake: bool = False
    # Can take new weights from the student (teacher.from_student with update_freq / ema_decay).
    load_weights: bool = False
    # Scores image+text batches of a vision-language teacher (opens the images itself).
    images: bool = False


TEACHER_BACKENDS: Registry[type["TeacherBackend"]] = Registry("teacher backend")


class TeacherBackend(ABC):
    """One teacher model on one device."""

    # The name it is registered under (for messages).
    name: ClassVar[str] = "teacher"

    def __init__(self, cfg: TeacherConfig, device: torch.device, architecture: Optional[ModelConfig] = None) -> None:
        """``architecture``: build the model from this config instead (self-distillation passes
        the student's, so the teacher has its architecture and initial weights)."""
        self.cfg = cfg
        self.device = device

    @classmethod
    def capabilities(cls) -> TeacherCapabilities:
        return TEACHER_BACKENDS.entry(cls.name).info or TeacherCapabilities()

    @abstractmethod
    def lm_head(self) -> LMHead:
        """The head whose application to the hidden states gives the teacher's logits."""

    @abstractmethod
    def score(self, batch: TokenBatch) -> TeacherOutput:
        """Post-norm last-layer hidden states at ``batch.loss_mask`` ([n_loss_tokens, hidden], rows
        in (sample, position) order), and whatever else the engine returns (top-k log-probs)."""

    def load_weights(self, state: dict[str, torch.Tensor], *, ema_decay: Optional[float] = None) -> None:
        """Self-distillation: copy (or average in) a bucket of the student's weights."""
        raise self._missing("load_weights")

    def weights(self) -> dict[str, torch.Tensor]:
        """Self-distillation checkpoints: the current weights, as :meth:`load_weights` takes them."""
        raise self._missing("load_weights")

    def sleep(self) -> None:
        """Colocation: free the accelerator while the students train."""
        raise self._missing("sleep_wake")

    def wake(self) -> None:
        """Undo :meth:`sleep`."""
        raise self._missing("sleep_wake")

    def _missing(self, capability: str) -> ModelError:
        return ModelError(f"teacher backend {self.name!r} has no {capability} capability")
