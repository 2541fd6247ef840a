"""The contracts of a backend: a teacher engine, a rollout engine, and how weights reach an engine.

A backend is a package under ``kdlib.backends`` (or a plugin's own module) that registers up to
three things, each by name and each with its typed options: a teacher backend (token batches in,
a :class:`~kdlib.teacher_output.TeacherOutput` out) with its declared
:class:`TeacherCapabilities`, a rollout backend (prompt ids in, sampled response ids out), and a
weight-sync strategy (how the student's weights reach that rollout engine after an on-policy
step). What a backend can do is declared, not assumed: a configuration that needs a capability the
chosen backend lacks (colocation needs sleep/wake, a self-distillation teacher needs weight
loading) fails at composition, before anything loads. Nothing outside a backend's package imports
it: the core finds it through these registries.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Optional

import torch

from kdlib.config.models import ModelConfig, TeacherConfig
from kdlib.config.rollout import TRANSPORT_SYNC, RolloutConfig
from kdlib.errors import ModelError
from kdlib.registry import Registry

if TYPE_CHECKING:
    from kdlib.batch import TokenBatch
    from kdlib.models.head import LMHead
    from kdlib.teacher_output import TeacherOutput


@dataclass(frozen=True)
class TeacherCapabilities:
    """What a teacher backend can do."""

    # The teacher signals it returns itself (teacher.signal.kind). A backend that returns hidden
    # states serves every other signal too: the teacher worker computes it from the hidden states
    # and the backend's head (kdlib.signals).
    signals: tuple[str, ...] = ("hidden",)
    # Can release its accelerator memory and take it back (pipeline.colocate).
    sleep_wake: bool = False
    # Can take new weights from the student (teacher.from_student with update_freq / ema_decay).
    load_weights: bool = False
    # Scores image+text batches of a vision-language teacher (opens the images itself).
    images: bool = False
    # Runs the teacher through transformers in this process (its attn_implementation applies).
    transformers: bool = False


TEACHER_BACKENDS: Registry[type["TeacherBackend"]] = Registry("teacher backend")
ROLLOUT_BACKENDS: Registry[type["RolloutBackend"]] = Registry("rollout backend")
# How a backend (by its name) generates about images: a class built around the backend whose
# ``generate(prompts, images, cfg, stop_ids=, pad_id=, seed=)`` takes a kdlib.batch.PromptImages.
# A backend not listed here cannot serve a vision-language student (refused at build).
IMAGE_ROLLOUT_BACKENDS: Registry[type] = Registry("rollout backend for images")
# Weight-sync strategies, named by RolloutConfig.weight_sync_strategy(): classes built with
# (students, rollout, cfg) whose sync() pushes the student's current weights to the engines.
WEIGHT_SYNCS: Registry[type] = Registry("weight sync")


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
    def lm_head(self) -> "LMHead":
        """The head whose application to the hidden states gives the teacher's logits."""

    @abstractmethod
    def score(self, batch: "TokenBatch") -> "TeacherOutput":
        """The teacher's signal at ``batch.loss_mask`` (rows in (sample, position) order): the
        configured ``cfg.signal`` when the backend returns it itself (its capabilities' ``signals``),
        else post-norm last-layer hidden states [n_loss_tokens, hidden]."""

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


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]  # the response only, through its end-of-turn token when it has one
    finish_reason: str  # "stop" (ended with an end-of-turn token) or "length" (cut)
    # When asked for: the log-probability of each token of ``token_ids`` under the distribution the
    # engine sampled from, temperature-scaled and before top-p truncation (greedy: the raw
    # distribution), as the engine computed it (its weights, its numerics).
    logprobs: Optional[list[float]] = None


class RolloutBackend(ABC):
    """One generation engine. Used by ``mode=generate`` (the teacher writes responses) and by
    on-policy distillation (the student samples). A response ends at the first end-of-turn token,
    which is kept; a response cut by ``max_new_tokens`` has no end token (``"length"``)."""

    def __init__(self, model: ModelConfig, device: torch.device, cfg: RolloutConfig) -> None:
        self.model_cfg = model
        self.device = device
        self.cfg = cfg

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a bucket of the student's weights into the engine's model."""
        from kdlib.models.weights import apply_state

        apply_state(self.model, state)

    def reserve(self, length: int) -> None:
        """Calls will need up to ``length`` positions (prompt + new tokens); a backend may size its
        caches for that once. Nothing to do by default."""

    @abstractmethod
    def generate(self, prompts: list[list[int]], *, stop_ids: set[int], pad_id: int, seed: int,
                 logprobs: bool = False) -> list[list[Generation]]:
        """``cfg.n_samples_per_prompt`` generations for each prompt, in prompt order; with
        ``logprobs`` each carries its tokens' log-probabilities (see :class:`Generation`)."""


class WeightSync(ABC):
    """Pushes the student's weights to the rollout engines after an optimizer step."""

    def __init__(self, students: Any, rollout: Any, cfg: Any) -> None:
        self.students = students
        self.rollout = rollout
        self.cfg = cfg

    @abstractmethod
    def sync(self) -> None:
        """Make the engines sample from the student's current weights."""


class TransportWeightSync(WeightSync):
    """The weight sync every rollout backend can do: the student's full weights in buckets of
    ``onpolicy.sync_bucket_mb`` through the transport, loaded by the backend's ``load_weights``."""

    def sync(self) -> None:
        self.rollout.load_weights(self.students.export_weights(self.cfg.onpolicy.sync_bucket_mb * 2**20))


WEIGHT_SYNCS.register(TRANSPORT_SYNC, TransportWeightSync)
