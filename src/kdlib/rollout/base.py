"""The rollout backend contract: prompt token ids in, sampled response token ids out.

Used by ``mode=generate`` (the teacher writes responses: sequence-level KD data) and by on-policy
distillation (the student samples). A response ends at the first end-of-turn token, which is kept;
a response cut by ``max_new_tokens`` has no end token and is marked ``finish_reason="length"``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from kdlib.config.schema import ModelConfig, RolloutConfig
from kdlib.registry import Registry

ROLLOUT_BACKENDS: Registry[type["RolloutBackend"]] = Registry("rollout backend")
# How each backend (by its name) generates about images: a class built around the backend whose
# ``generate(prompts, images, cfg, stop_ids=, pad_id=, seed=)`` takes a kdlib.batch.PromptImages.
# A backend not listed here cannot serve a vision-language student (refused at build).
IMAGE_ROLLOUT_BACKENDS: Registry[type] = Registry("rollout backend for images")
IMAGE_ROLLOUT_BACKENDS.register("hf", "kdlib.rollout.hf_vision:HFImageGeneration")


@dataclass
class Generation:
    """One sampled response."""

    token_ids: list[int]  # the response only, through its end-of-turn token when it has one
    finish_reason: str  # "stop" (ended with an end-of-turn token) or "length" (cut)


class RolloutBackend(ABC):
    def __init__(self, model: ModelConfig, device: torch.device) -> None:
        self.model_cfg = model
        self.device = device

    def load_weights(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a bucket of the student's weights into the engine's model."""
        from kdlib.models.weights import apply_state

        apply_state(self.model, state)

    def reserve(self, length: int) -> None:
        """Calls will need up to ``length`` positions (prompt + new tokens); a backend may size its
        caches for that once. Nothing to do by default."""

    @abstractmethod
    def generate(
        self, prompts: list[list[int]], cfg: RolloutConfig, *, stop_ids: set[int], pad_id: int, seed: int
    ) -> list[list[Generation]]:
        """``cfg.n_samples_per_prompt`` generations for each prompt, in prompt order."""
