"""The teacher backend contract: token batches in, post-norm hidden states at loss positions out.

A backend wraps one inference engine (transformers now; SGLang on GPUs). It also exposes the
teacher's language-model head, which the students use to turn the hidden states back into logits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional

import torch

from kdlib.batch import TokenBatch
from kdlib.config.schema import ModelConfig, TeacherConfig
from kdlib.models.head import LMHead
from kdlib.registry import Registry

TEACHER_BACKENDS: Registry[type["TeacherBackend"]] = Registry("teacher backend")


class TeacherBackend(ABC):
    """One teacher model on one device."""

    def __init__(self, cfg: TeacherConfig, device: torch.device, architecture: Optional[ModelConfig] = None) -> None:
        """``architecture``: build the model from this config instead (self-distillation passes
        the student's, so the teacher has its architecture and initial weights)."""
        self.cfg = cfg
        self.device = device

    @abstractmethod
    def lm_head(self) -> LMHead:
        """The head whose application to the hidden states gives the teacher's logits."""

    @abstractmethod
    def hidden_states(self, batch: TokenBatch) -> torch.Tensor:
        """Post-norm last-layer hidden states at ``batch.loss_mask``, [n_loss_tokens, hidden]."""

    def load_weights(self, state: dict[str, torch.Tensor], *, ema_decay: Optional[float] = None) -> None:
        """Self-distillation: copy (or average in) a bucket of the student's weights."""
        from kdlib.models.weights import apply_state

        apply_state(self.model, state, ema_decay=ema_decay)

    def sleep(self) -> None:
        """Colocation: free the accelerator (weights to host memory); a no-op on the CPU."""
        model = getattr(self, "model", None)
        if model is not None and self.device.type == "cuda":
            model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        """Undo :meth:`sleep`."""
        model = getattr(self, "model", None)
        if model is not None and self.device.type == "cuda":
            model.to(self.device)
