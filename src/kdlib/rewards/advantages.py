"""Group-normalised advantages: each sampled response against the other samples of its prompt.

With ``rollout.n_samples_per_prompt = G`` samples per prompt, the advantage of sample i of a
group is ``A_i = (r_i - mean(r)) / (std(r) + eps)`` (GRPO, Shao et al. 2024, eq. 3 of section
4.1.2), or ``A_i = r_i - mean(r)`` without the division (Dr. GRPO, Liu et al. 2025, which removes
the per-question difficulty bias of the std). ``std`` is the sample standard deviation (divisor
G - 1, as TRL's GRPO and ``torch.std``); a group of one sample, or one whose rewards are all equal,
gets advantage 0 for every sample: nothing to prefer. Computed in float64 on the controller.
"""

from __future__ import annotations

import math
from typing import Sequence


def group_advantages(rewards: Sequence[float], group_size: int, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> list[float]:
    """Advantages of ``rewards`` laid out as consecutive groups of ``group_size``."""
    if group_size < 1 or len(rewards) % group_size:
        raise ValueError(f"{len(rewards)} rewards do not form groups of {group_size}")
    out: list[float] = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start : start + group_size]]
        if len(set(group)) == 1:  # one sample, or equal rewards: exactly 0 (not a rounding residue)
            out.extend(0.0 for _ in group)
            continue
        mean = math.fsum(group) / len(group)
        centred = [r - mean for r in group]
        if scale_by_std:
            std = math.sqrt(math.fsum(c * c for c in centred) / (len(group) - 1))
            centred = [c / (std + eps) for c in centred]
        out.extend(centred)
    return out


def group_std(rewards: Sequence[float], group_size: int) -> float:
    """The mean over groups of each group's reward standard deviation (sample std; 0 for groups of
    one): how much the samples of a prompt disagree, the signal group advantages learn from."""
    stds = []
    for start in range(0, len(rewards), group_size):
        group = [float(r) for r in rewards[start : start + group_size]]
        if len(group) < 2:
            stds.append(0.0)
            continue
        mean = math.fsum(group) / len(group)
        stds.append(math.sqrt(math.fsum((r - mean) ** 2 for r in group) / (len(group) - 1)))
    return math.fsum(stds) / max(len(stds), 1)
