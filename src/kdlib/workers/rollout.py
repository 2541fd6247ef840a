"""RolloutWorker: one generation engine, wherever a launcher places it (a plain class).

For on-policy KD it holds a copy of the student (same architecture) and takes the student's
weights after every optimizer step, in buckets through the transport.
"""

from __future__ import annotations

from typing import Any

from kdlib.config.schema import RolloutConfig
from kdlib.models.loading import resolve_device
from kdlib.rollout import ROLLOUT_BACKENDS, Generation
from kdlib.transport import build_transport
from kdlib.workers.specs import RolloutSpec


class RolloutWorker:
    def __init__(self, spec: RolloutSpec) -> None:
        self.rank = spec.rank
        self.cfg = spec.rollout
        entry = ROLLOUT_BACKENDS.entry(spec.rollout.backend)
        # a backend registered with its own options (a RolloutConfig subclass) takes them at start
        options = (spec.rollout,) if entry.config_cls not in (None, RolloutConfig) else ()
        self.backend = entry.load()(spec.model, resolve_device(spec.device), *options)
        self.transport = build_transport(spec.transport) if spec.transport is not None else None

    def load_weights(self, handles: list[Any]) -> None:
        """Take the student's weights (transport buckets from ``StudentWorker.export_weights``)."""
        assert self.transport is not None, "a rollout worker that syncs weights needs a transport"
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle))

    def generate_about_images(
        self, prompts: list[list[int]], stop_ids: set[int], pad_id: int, seed: int, images: Any = None
    ) -> list[list[Generation]]:
        """:meth:`generate` for the prompts of a vision-language student, with their pictures
        (``images``: a :class:`kdlib.batch.PromptImages`, or None when none of them has one), laid
        out by the model's own processor (see ``kdlib.rollout.base.IMAGE_ROLLOUT_BACKENDS``)."""
        if images is None:
            return self.generate(prompts, stop_ids, pad_id, seed)
        if getattr(self, "_image_generation", None) is None:
            from kdlib.rollout.base import IMAGE_ROLLOUT_BACKENDS

            self._image_generation = IMAGE_ROLLOUT_BACKENDS.get(self.cfg.backend)(self.backend)
        return self._image_generation.generate(prompts, images, self.cfg, stop_ids=set(stop_ids), pad_id=pad_id, seed=seed)

    def reserve(self, length: int) -> None:
        """Calls will need up to ``length`` positions (the longest prompt plus max_new_tokens)."""
        self.backend.reserve(length)

    def generate(self, prompts: list[list[int]], stop_ids: set[int], pad_id: int, seed: int) -> list[list[Generation]]:
        """``rollout.n_samples_per_prompt`` responses per prompt, ending at a ``stop_ids`` token."""
        return self.backend.generate(prompts, self.cfg, stop_ids=set(stop_ids), pad_id=pad_id, seed=seed)

    # rollout.sglang.weight_sync=distributed (kdlib.rollout.sglang_sync): the engine receives a
    # broadcast from student rank 0 instead of transport buckets

    def join_weight_group(self, *args: Any) -> None:
        self.backend.join_weight_group(*args)

    def receive_weights(self, plan: list, group_name: str) -> None:
        self.backend.receive_weights(plan, group_name)
