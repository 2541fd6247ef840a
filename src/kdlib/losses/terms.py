"""What a loss computation returns for one micro-batch: the leaf type both loss paths share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class LossTerms:
    """What one micro-batch contributes to an optimizer step."""

    # Differentiable (kd_weight * kd_sum + ce_weight * ce_sum) / normaliser.
    loss: torch.Tensor
    # Detached sum over tokens of the per-token divergence (0 when no teacher).
    kd_sum: torch.Tensor
    # Detached sum over tokens of the student cross-entropy (0 when no targets).
    ce_sum: torch.Tensor
    # Loss tokens in this micro-batch.
    n_tokens: int
    # Detached sum over tokens of the policy-gradient term, -w_t log p(y_t); None without one
    # (kdlib.losses.policy_gradient). ``loss`` includes it.
    pg_sum: Optional[torch.Tensor] = None

    @staticmethod
    def total(parts: list["LossTerms"]) -> "LossTerms":
        """The terms of several parts of one micro-batch added (one part: itself)."""
        if len(parts) == 1:
            return parts[0]
        first, rest = parts[0], parts[1:]
        pg = [p.pg_sum for p in parts if p.pg_sum is not None]
        return LossTerms(
            loss=sum((p.loss for p in rest), first.loss),
            kd_sum=sum((p.kd_sum for p in rest), first.kd_sum),
            ce_sum=sum((p.ce_sum for p in rest), first.ce_sum),
            n_tokens=sum(p.n_tokens for p in parts),
            pg_sum=sum(pg[1:], pg[0]) if pg else None,
        )
