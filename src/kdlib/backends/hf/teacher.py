"""transformers teacher backend: the embedded default, on CPU or GPU, in inference mode.

The model is loaded in the configured dtype, frozen, and its head identity
``lm_head(final hidden) == logits`` is checked on a probe input before any data is scored. On a
GPU, sleep/wake move the weights to host memory and back (colocation); on the CPU they do nothing.

A vision-language teacher is loaded with its processor; its head is checked on a probe holding an
image, and each batch's images (references) are opened and laid out by its own processor before
the image-aware forward. What it returns is the same carrier: hidden states at the loss rows.
"""

from __future__ import annotations

from typing import Optional

import torch

from kdlib.backends.base import TeacherBackend
from kdlib.batch import TokenBatch
from kdlib.config.schema import ModelConfig, TeacherConfig
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import LMHead, lm_head_of, verify_lm_head
from kdlib.models.student import build_model
from kdlib.models.vlm import image_layout_for, verify_vlm_head
from kdlib.models.weights import apply_state
from kdlib.teacher_output import TeacherOutput


class HFTeacherBackend(TeacherBackend):
    name = "hf"

    def __init__(self, cfg: TeacherConfig, device: torch.device, architecture: Optional[ModelConfig] = None) -> None:
        super().__init__(cfg, device)
        # self-distillation builds the teacher like the student, in the teacher's dtype
        self.model = build_model(architecture or cfg, device, dtype=cfg.dtype)
        self.model.eval()
        self.model.requires_grad_(False)
        self.images = image_layout_for(architecture or cfg, self.model, name="teacher")
        if self.images is not None:
            self._head = verify_vlm_head(self.model, self.images.processor)
        else:
            self._head = lm_head_of(self.model)
            verify_lm_head(self.model, self._head)

    def lm_head(self) -> LMHead:
        return self._head

    @torch.inference_mode()
    def score(self, batch: TokenBatch) -> TeacherOutput:
        if self.images is not None:
            batch = self.images.attach(batch)
        return TeacherOutput(hidden=hidden_at_loss_positions(self.model, batch.to(self.device)))

    def load_weights(self, state: dict[str, torch.Tensor], *, ema_decay: Optional[float] = None) -> None:
        apply_state(self.model, state, ema_decay=ema_decay)

    def weights(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach() for name, tensor in self.model.state_dict().items()}

    def sleep(self) -> None:
        if self.device.type == "cuda":
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake(self) -> None:
        if self.device.type == "cuda":
            self.model.to(self.device)
