"""The reward contract and registry: a task score for each finished on-policy rollout.

On-policy distillation can add a policy-gradient term on a task reward (see
:mod:`kdlib.algorithms.reward`). A reward is a registry entry like a loss or an algorithm: a name,
a :class:`Reward` class and its typed config (a :class:`RewardConfig` subclass), selected with
``reward=<name>`` and its options as ``reward.<option>=...``; users register their own with
``@kdlib.register_reward("name", config=MyConfig)``. The default, ``reward=none``, scores nothing
and leaves the on-policy loop as it was. A reward sees one :class:`Rollout` at a time (the prompt,
the decoded response and the sample's data row) and returns a finite number; :func:`score`
turns a raise, a non-number or a NaN into a one-line :class:`~kdlib.errors.RewardError` naming
the reward and the sample's row.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from omegaconf import MISSING

from kdlib.config.node import ConfigNode
from kdlib.errors import KdlibError, RewardError, first_line
from kdlib.registry import Registry

REWARDS: Registry[type["Reward"]] = Registry("reward")

# reward=none: no reward, no advantages (the on-policy loop trains on the KD loss alone).
NO_REWARD = "none"


@dataclass
class RewardConfig(ConfigNode):
    """Base of every reward's config; `name` selects the registry entry."""

    # Reward (registry `reward`): none, exact_match, numeric, regex, length, python, or a registered one.
    name: str = MISSING
    # Group-normalised advantages: divide each group's centred rewards by the group's standard
    # deviation (+ eps), as GRPO; false: only centre them (Dr. GRPO).
    scale_by_std: bool = True
    # Added to a group's standard deviation before dividing.
    eps: float = 1e-6
    # Held-out reward: how many data.eval prompts the rollout engine answers at each evaluation
    # (rollout.n_samples_per_prompt samples each, rollout.temperature, a fixed seed); 0: none.
    eval_prompts: int = 32

    def check(self) -> None:
        if self.eps <= 0:
            raise ValueError(f"eps must be > 0, got {self.eps}")
        if self.eval_prompts < 0:
            raise ValueError(f"eval_prompts must be >= 0, got {self.eval_prompts}")

    @property
    def enabled(self) -> bool:
        return self.name != NO_REWARD


@dataclass(frozen=True)
class Rollout:
    """What a reward sees of one finished rollout."""

    index: int  # the sample's row in its dataset (0-based)
    prompt: list  # the student's prompt as chat messages [{"role": ..., "content": ...}]
    response: str  # the sampled response, decoded without special tokens
    row: Mapping[str, Any]  # the sample's data row (every column of the file)
    n_tokens: int  # sampled response tokens
    finished: bool  # ended with an end-of-turn token (False: cut by rollout.max_new_tokens)


class Reward(ABC):
    """Scores finished rollouts; stateless between calls unless it says otherwise."""

    def __init__(self, cfg: RewardConfig) -> None:
        self.cfg = cfg

    def columns(self) -> tuple[str, ...]:
        """Data columns every row must have (checked at preflight, before any model loads)."""
        return ()

    def describe(self) -> str:
        """How errors name this reward (``reward=numeric``; a user function adds its path)."""
        return f"reward={self.cfg.name}"

    @abstractmethod
    def __call__(self, rollout: Rollout) -> float:
        """The rollout's reward: a finite number."""


def register_reward(name: str, *, config: type[RewardConfig] = RewardConfig) -> Callable:
    """Class decorator registering a :class:`Reward` subclass under ``name``."""
    return REWARDS.class_decorator(name, Reward, config, RewardConfig, "kdlib.rewards")


def build_reward(cfg: RewardConfig) -> Reward:
    """The reward ``cfg`` selects."""
    return REWARDS.get(cfg.name)(cfg)


def score(reward: Reward, rollout: Rollout, where: str) -> float:
    """``reward(rollout)`` as a float; a raise, a non-number or a non-finite value is a one-line
    RewardError naming the reward and ``where`` (the sample: file and row)."""
    try:
        value = reward(rollout)
    except KdlibError:
        raise
    except Exception as exc:  # noqa: BLE001 - the reward's own code failed: name it and the sample
        raise RewardError(f"{reward.describe()} raised {type(exc).__name__}: {first_line(exc)} "
                          f"(rollout of {where})") from None
    if not isinstance(value, numbers.Real):  # bools count as 0 and 1
        raise RewardError(f"{reward.describe()} returned {type(value).__name__} {value!r:.60}, not a number "
                          f"(rollout of {where})")
    value = float(value)
    if not math.isfinite(value):
        raise RewardError(f"{reward.describe()} returned {value}, not a finite number (rollout of {where})")
    return value
