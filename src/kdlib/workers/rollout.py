"""RolloutWorker: one generation engine, wherever a launcher places it (a plain class)."""

from __future__ import annotations

from kdlib.config.schema import ModelConfig, RolloutConfig
from kdlib.models.loading import resolve_device
from kdlib.rollout import ROLLOUT_BACKENDS, Generation


class RolloutWorker:
    def __init__(self, model: ModelConfig, rollout: RolloutConfig, device: str, rank: int = 0) -> None:
        self.rank = rank
        self.cfg = rollout
        self.backend = ROLLOUT_BACKENDS.get(rollout.backend)(model, resolve_device(device))

    def generate(self, prompts: list[list[int]], *, stop_ids: set[int], pad_id: int, seed: int) -> list[list[Generation]]:
        return self.backend.generate(prompts, self.cfg, stop_ids=stop_ids, pad_id=pad_id, seed=seed)
