"""Rollout (generation) backends (registry ``rollout backend``).

``IMAGE_ROLLOUT_BACKENDS`` holds, under the same names, the variants that generate about images:
a rollout worker running a vision-language model takes its backend from there.
"""

from kdlib.config.schema import RolloutConfig
from kdlib.rollout.base import IMAGE_ROLLOUT_BACKENDS, ROLLOUT_BACKENDS, Generation, RolloutBackend

ROLLOUT_BACKENDS.register("hf", "kdlib.rollout.hf:HFRolloutBackend", config=RolloutConfig)
IMAGE_ROLLOUT_BACKENDS.register("hf", "kdlib.rollout.hf_vision:HFVisionRolloutBackend", config=RolloutConfig)

__all__ = ["IMAGE_ROLLOUT_BACKENDS", "ROLLOUT_BACKENDS", "Generation", "RolloutBackend"]
