"""Scoring a step's rollouts on the controller: rewards, group advantages, their metrics.

The on-policy loop samples ``rollout.n_samples_per_prompt`` responses per prompt, in prompt order
(every rollout backend returns them grouped so). :class:`RolloutScorer` calls the configured
reward on each finished rollout (its prompt, its decoded response, its data row), turns the rewards
into group-normalised advantages and writes each into its sample (``Sample.advantage``), which
collation spreads over the sample's loss tokens. It also scores the held-out prompts: the mean
reward of the rollout engine's samples for the first ``reward.eval_prompts`` prompts of data.eval,
drawn with a fixed seed, so that every evaluation of a run (and of runs compared with each other)
draws from the same random stream. Rewards are stateless: a resumed run scores its rollouts as
the uninterrupted run did, without any saved state.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Sequence

from kdlib.rewards.advantages import group_advantages, group_std
from kdlib.rewards.base import RewardConfig, Rollout, build_reward, score

if TYPE_CHECKING:
    from kdlib.backends.base import Generation
    from kdlib.data.samples import Prompt, Sample

# Added to the run's seed for the held-out rollouts (any constant apart from the training steps').
HELDOUT_SEED_OFFSET = 7_919_000


class RolloutScorer:
    """The reward of one run and what it computes from it."""

    def __init__(self, cfg: RewardConfig, group_size: int, decode: Callable[[list[int]], str]) -> None:
        self.cfg = cfg
        self.reward = build_reward(cfg)
        self.group_size = group_size
        self.decode = decode  # response token ids -> text, special tokens skipped

    def rewards(self, prompts: Sequence["Prompt"], generations: Sequence[Sequence["Generation"]],
                texts: Sequence[str], split: str = "data.train") -> list[float]:
        """One reward per rollout, in order (``texts``: the decoded responses, flattened)."""
        rollouts = [(prompt, out) for prompt, outs in zip(prompts, generations, strict=True) for out in outs]
        return [
            score(self.reward, Rollout(index=prompt.index, prompt=prompt.conversation, response=text,
                                       row=prompt.row, n_tokens=len(out.token_ids),
                                       finished=out.finish_reason == "stop"),
                  f"{split} row {prompt.index + 1}")
            for (prompt, out), text in zip(rollouts, texts, strict=True)
        ]

    def score_step(self, prompts: Sequence["Prompt"], generations: Sequence[Sequence["Generation"]],
                   texts: Sequence[str], samples: Sequence["Sample"]) -> tuple[list[float], dict[str, float]]:
        """Rewards of a step's rollouts, their advantages written into ``samples``; (rewards, metrics)."""
        start = time.perf_counter()
        rewards = self.rewards(prompts, generations, texts)
        advantages = group_advantages(rewards, self.group_size, scale_by_std=self.cfg.scale_by_std, eps=self.cfg.eps)
        for sample, advantage in zip(samples, advantages, strict=True):
            sample.advantage = advantage
        return rewards, {
            "reward_mean": sum(rewards) / len(rewards),
            "reward_group_std": group_std(rewards, self.group_size),
            "reward_seconds": time.perf_counter() - start,
        }

    def heldout(self, prompts: Sequence["Prompt"], generate: Callable[[list["Prompt"], int], list[list["Generation"]]],
                seed: int) -> float:
        """Mean reward of ``generate``'s samples for the first ``eval_prompts`` of ``prompts``."""
        chosen = list(prompts[: self.cfg.eval_prompts])
        generations = generate(chosen, seed + HELDOUT_SEED_OFFSET)
        texts = [self.decode(out.token_ids) for outs in generations for out in outs]
        rewards = self.rewards(chosen, generations, texts, split="data.eval")
        return sum(rewards) / len(rewards)
