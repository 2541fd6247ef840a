"""RolloutWorker: one generation engine, wherever a launcher places it (a plain class).

For on-policy KD it holds a copy of the student (same architecture) and takes the student's
weights after every optimizer step, in buckets through the transport.
"""

from __future__ import annotations

from typing import Any, Optional

from kdlib.batch import PromptImages
from kdlib.models.loading import resolve_device
from kdlib.models.vlm import checkpoint_is_vision_language
from kdlib.rollout import ROLLOUT_BACKENDS, Generation
from kdlib.rollout.base import IMAGE_ROLLOUT_BACKENDS
from kdlib.transport import build_transport
from kdlib.workers.specs import RolloutSpec


class RolloutWorker:
    def __init__(self, spec: RolloutSpec) -> None:
        self.rank = spec.rank
        self.cfg = spec.rollout
        # a vision-language model generates with the backend's image variant
        backends = IMAGE_ROLLOUT_BACKENDS if checkpoint_is_vision_language(spec.model) else ROLLOUT_BACKENDS
        self.backend = backends.get(spec.rollout.backend)(spec.model, resolve_device(spec.device))
        self.transport = build_transport(spec.transport) if spec.transport is not None else None

    def load_weights(self, handles: list[Any]) -> None:
        """Take the student's weights (transport buckets from ``StudentWorker.export_weights``)."""
        assert self.transport is not None, "a rollout worker that syncs weights needs a transport"
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle))

    def generate(
        self, prompts: list[list[int]], stop_ids: set[int], pad_id: int, seed: int, images: Optional[PromptImages] = None
    ) -> list[list[Generation]]:
        """``rollout.n_samples_per_prompt`` responses per prompt, ending at a ``stop_ids`` token;
        ``images``: the prompts' images (a vision-language student answering about them)."""
        extra = {} if images is None else {"images": images}
        return self.backend.generate(prompts, self.cfg, stop_ids=set(stop_ids), pad_id=pad_id, seed=seed, **extra)
