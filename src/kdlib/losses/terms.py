"""What a loss computation returns for one micro-batch: the leaf type both loss paths share."""

from __future__ import annotations

from dataclasses import dataclass

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
