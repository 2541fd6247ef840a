"""Rollout (generation) backends (registry ``rollout backend``)."""

from kdlib.config.schema import RolloutConfig, SGLangRolloutConfig
from kdlib.rollout.base import ROLLOUT_BACKENDS, Generation, RolloutBackend

ROLLOUT_BACKENDS.register("hf", "kdlib.rollout.hf:HFRolloutBackend", config=RolloutConfig)
ROLLOUT_BACKENDS.register("sglang", "kdlib.rollout.sglang:SGLangRolloutBackend", config=SGLangRolloutConfig)

__all__ = ["ROLLOUT_BACKENDS", "Generation", "RolloutBackend"]
