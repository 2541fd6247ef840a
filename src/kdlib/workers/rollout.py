"""RolloutWorker: one generation engine, wherever a launcher places it (a plain class).

For on-policy KD it holds a copy of the student (same architecture) and takes the student's
weights after every optimizer step, in buckets through the transport (or however the backend's
weight sync delivers them: its worker calls reach the engine as ``worker.backend``).
"""

from __future__ import annotations

from typing import Any

from kdlib.backends import IMAGE_ROLLOUT_BACKENDS, ROLLOUT_BACKENDS, Generation
from kdlib.models.loading import resolve_device
from kdlib.transport import build_transport
from kdlib.workers.specs import RolloutSpec


class RolloutWorker:
    def __init__(self, spec: RolloutSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.cfg = spec.rollout
        self.backend = ROLLOUT_BACKENDS.get(spec.rollout.backend)(spec.model, resolve_device(spec.device), spec.rollout)
        self.transport = build_transport(spec.transport) if spec.transport is not None else None
        self._image_generation = None

    def load_weights(self, handles: list[Any]) -> None:
        """Take the student's weights (transport buckets from ``StudentWorker.export_weights``)."""
        assert self.transport is not None, "a rollout worker that syncs weights needs a transport"
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle))

    def reserve(self, length: int) -> None:
        """Calls will need up to ``length`` positions (the longest prompt plus max_new_tokens)."""
        self.backend.reserve(length)

    def generate(self, prompts: list[list[int]], stop_ids: set[int], pad_id: int, seed: int,
                 images: Any = None) -> list[list[Generation]]:
        """``rollout.n_samples_per_prompt`` responses per prompt, ending at a ``stop_ids`` token.
        A vision-language student's prompts come with their pictures (``images``: a
        :class:`kdlib.batch.PromptImages`, None when none has one), laid out by the model's own
        processor (see ``kdlib.backends.IMAGE_ROLLOUT_BACKENDS``)."""
        options = dict(stop_ids=set(stop_ids), pad_id=pad_id, seed=seed, logprobs=self.spec.logprobs)
        if images is None:
            return self.backend.generate(prompts, **options)
        if self._image_generation is None:
            self._image_generation = IMAGE_ROLLOUT_BACKENDS.get(self.cfg.backend)(self.backend)
        return self._image_generation.generate(prompts, images, **options)
