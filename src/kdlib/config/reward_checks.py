"""Rules across a config for on-policy rewards and the reward objectives.

A reward only where rollouts are sampled (mode=onpolicy); a policy-gradient objective only
on-policy, and with a reward when it weighs one; on-policy distillation only at loss temperature
1 (it compares the two models' log-probabilities of the sampled tokens), and importance weights
only for rollouts sampled at temperature 1 (the trainer's ratio is taken at temperature 1). Pure functions of the config,
run with the other checks before any model loads.
"""

from __future__ import annotations

from typing import Any

from kdlib.errors import ConfigError


def check_reward_config(cfg: Any) -> None:
    """Rules across ``cfg`` (a KDConfig) for rewards and reward objectives; ConfigError."""
    from kdlib.algorithms import ALGORITHMS
    from kdlib.algorithms.reward import RewardKD

    reward = cfg.reward
    algorithm = ALGORITHMS.get(cfg.algorithm.name)
    if reward.enabled and cfg.mode.value != "onpolicy":
        raise ConfigError(f"reward={reward.name} scores on-policy rollouts: it needs mode=onpolicy "
                          f"(+recipe=onpolicy), not mode={cfg.mode.value}")
    if not issubclass(algorithm, RewardKD):
        return
    if cfg.mode.value != "onpolicy":
        raise ConfigError(f"algorithm={cfg.algorithm.name} is a policy-gradient objective: it needs mode=onpolicy")
    if cfg.algorithm.reward_weight and not reward.enabled:
        raise ConfigError(f"algorithm.reward_weight={cfg.algorithm.reward_weight} needs a reward: set reward=<name> "
                          "(exact_match, numeric, regex, length, python, ...) or algorithm.reward_weight=0")
    if cfg.algorithm.is_clip is not None and cfg.rollout.temperature != 1.0:
        raise ConfigError(f"algorithm.is_clip compares the trainer's probabilities of the sampled tokens at temperature "
                          f"1 with the engine's: set rollout.temperature=1, not {cfg.rollout.temperature}")
    if not algorithm.kd_trains and cfg.loss.temperature != 1.0:
        raise ConfigError(f"algorithm=opd compares log-probabilities at temperature 1: set loss.temperature=1, "
                          f"not {cfg.loss.temperature}")
