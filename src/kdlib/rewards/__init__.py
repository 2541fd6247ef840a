"""Task rewards for on-policy runs (registry ``reward``): what scores a finished rollout.

Importing this package registers the built-in rewards (:mod:`kdlib.rewards.builtin`). A user's
reward is a :class:`Reward` subclass registered with :func:`register_reward` (selected with
``reward=<name>``), or any function given as ``reward=python reward.fn=module:function``.
"""

from kdlib.rewards.base import (
    NO_REWARD, REWARDS, Reward, RewardConfig, Rollout, build_reward, register_reward, score,
)
from kdlib.rewards import builtin as _builtin  # noqa: F401  (registers the built-ins)

__all__ = ["NO_REWARD", "REWARDS", "Reward", "RewardConfig", "Rollout", "build_reward", "register_reward", "score"]
