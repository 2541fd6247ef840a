"""Rollout (generation) backends (registry ``rollout backend``)."""

from kdlib.config.schema import RolloutConfig
from kdlib.rollout.base import ROLLOUT_BACKENDS, Generation, RolloutBackend

ROLLOUT_BACKENDS.register("hf", "kdlib.rollout.hf:HFRolloutBackend", config=RolloutConfig)

__all__ = ["ROLLOUT_BACKENDS", "Generation", "RolloutBackend"]
