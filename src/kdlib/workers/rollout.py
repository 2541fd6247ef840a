"""RolloutWorker: one generation engine, wherever a launcher places it (a plain class).

For on-policy KD it holds a copy of the student (same architecture) and takes the student's
weights after every optimizer step, in buckets through the transport.
"""

from __future__ import annotations

from typing import Any, Optional

from kdlib.config.schema import ModelConfig, RolloutConfig, TransportConfig
from kdlib.models.loading import resolve_device
from kdlib.rollout import ROLLOUT_BACKENDS, Generation
from kdlib.transport import build_transport


class RolloutWorker:
    def __init__(
        self, model: ModelConfig, rollout: RolloutConfig, device: str, rank: int = 0,
        transport: Optional[TransportConfig] = None,
    ) -> None:
        self.rank = rank
        self.cfg = rollout
        self.backend = ROLLOUT_BACKENDS.get(rollout.backend)(model, resolve_device(device))
        self.transport = build_transport(transport) if transport is not None else None

    def load_weights(self, handles: list[Any]) -> None:
        """Take the student's weights (transport buckets from ``StudentWorker.export_weights``)."""
        assert self.transport is not None, "a rollout worker that syncs weights needs a transport"
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle))

    def generate(self, prompts: list[list[int]], stop_ids: set[int], pad_id: int, seed: int) -> list[list[Generation]]:
        """``rollout.n_samples_per_prompt`` responses per prompt, ending at a ``stop_ids`` token."""
        return self.backend.generate(prompts, self.cfg, stop_ids=set(stop_ids), pad_id=pad_id, seed=seed)
