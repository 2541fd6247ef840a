"""The per-token weights of the policy-gradient term, the one objective term that is not a divergence.

A policy-gradient term on the student's own samples is ``-(1/N) sum_t w_t log p_student(y_t)``
with a detached weight ``w_t`` per sampled token: a cross-entropy on the sampled tokens, weighted
per token. The chunked engine (:mod:`kdlib.losses.engine`) adds it to the CE it already computes:
no [tokens, vocab] tensor and no second loop. This module says what ``w_t`` is:

    w_t = (a_t + teacher_weight * (log p_teacher(y_t) - log p_student(y_t))) * rho_t

- ``a_t``: the sample's group-normalised task advantage times the reward weight, on each of its
  tokens (:mod:`kdlib.rewards.advantages`);
- the teacher's log-ratio: on-policy distillation as policy gradient (Thinking Machines, "On-Policy
  Distillation", 2025): the per-token advantage is the negated single-sample estimate of the
  reverse KL, ``log p_teacher(y_t) - log p_student(y_t)``, both at temperature 1, from the same
  teacher logits the KD term computes;
- ``rho_t = min(exp(log p_student(y_t) - log p_rollout(y_t)), is_clip)``: truncated importance
  sampling (Ionides 2008; Yao et al. 2025 for rollout engines whose numerics differ from the
  trainer's), 1 where the engine gave no log-prob (NaN) or ``is_clip`` is None.

Every factor is detached: the gradient of the term is ``-(1/N) sum_t w_t grad log p_student(y_t)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class PolicyGradient:
    """The weights' ingredients for N loss rows."""

    # [N] task advantage per loss row, already multiplied by the reward weight; None: none.
    advantages: Optional[torch.Tensor] = None
    # Coefficient of the teacher's per-token log-ratio (on-policy distillation); 0: off.
    teacher_weight: float = 0.0
    # [N] the rollout engine's log-probability of each sampled token (NaN: none); None: none.
    rollout_logprobs: Optional[torch.Tensor] = None
    # Truncated importance sampling: the ratio's cap; None: no importance ratio.
    is_clip: Optional[float] = None

    @property
    def needs_teacher(self) -> bool:
        return self.teacher_weight != 0.0

    def weights(self, rows: slice, student_logprob: torch.Tensor,
                teacher_logprob: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``w_t`` for the loss ``rows`` given the student's (and teacher's) log-probabilities of
        the sampled tokens there, in their dtype; no autograd."""
        with torch.no_grad():
            lp = student_logprob.detach()
            w = torch.zeros_like(lp)
            if self.advantages is not None:
                w = w + self.advantages[rows].to(lp.dtype)
            if self.teacher_weight:
                if teacher_logprob is None:
                    raise ValueError("on-policy distillation needs the teacher's log-probabilities of the samples")
                w = w + self.teacher_weight * (teacher_logprob.detach().to(lp.dtype) - lp)
            if self.is_clip is not None and self.rollout_logprobs is not None:
                w = w * importance_ratio(lp, self.rollout_logprobs[rows].to(lp.dtype), self.is_clip)
            return w


def importance_ratio(train_logprob: torch.Tensor, rollout_logprob: torch.Tensor, clip: float) -> torch.Tensor:
    """``min(exp(log p_train - log p_rollout), clip)`` per token, 1 where the rollout's is NaN."""
    ratio = torch.exp(train_logprob - rollout_logprob).clamp(max=clip)
    return torch.where(torch.isnan(rollout_logprob), torch.ones_like(ratio), ratio)
