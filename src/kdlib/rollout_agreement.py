"""How far the rollout engine's log-probabilities of its sampled tokens are from the trainer's.

On-policy training assumes the tokens were sampled from the policy being trained. The rollout
engine is a separate copy of it (another process, other kernels, maybe a compiled graph or bf16
numerics, weights synced once per step), so its probability of a sampled token, q, may differ from
the trainer's, p. Every on-policy step measures that gap over the step's sampled tokens, from
numbers both sides compute anyway (the engine's drawn-token log-probabilities and the trainer's
cross-entropy rows, :mod:`kdlib.losses.target_logprobs`): the k3 estimate of KL(q || p), the mean
over sampled tokens of ``exp(r) - 1 - r`` with ``r = log p - log q`` (non-negative, unbiased
since the tokens are drawn from q; Schulman's "Approximating KL divergence"), and the largest
``|log p - log q|``. They are ``rollout_k3`` and ``rollout_logprob_max_abs_diff`` in
metrics.jsonl; ``onpolicy.agreement_warn_k3`` sets the mean k3 above which a step warns (once).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

log = logging.getLogger(__name__)


@dataclass
class AgreementSums:
    """One worker's sums over the sampled tokens of a step (added over micro-batches and workers)."""

    k3_sum: float = 0.0
    tokens: int = 0  # sampled tokens compared
    max_abs_diff: float = 0.0
    # sampled tokens the trainer's log-probability was not recorded for (an algorithm that does
    # not run the student's targets through the loss engine)
    unmeasured: int = 0

    @classmethod
    def of(cls, trainer: Optional[torch.Tensor], rollout: torch.Tensor) -> "AgreementSums":
        """Sums over the rows where the engine reported a log-probability (``rollout`` not NaN)."""
        sampled = ~torch.isnan(rollout)
        if trainer is None:
            return cls(unmeasured=int(sampled.sum()))
        both = sampled & ~torch.isnan(trainer)
        r = trainer[both].double() - rollout[both].double()
        if r.numel() == 0:
            return cls(unmeasured=int(sampled.sum()))
        return cls(k3_sum=float((torch.expm1(r) - r).sum()), tokens=int(r.numel()),
                   max_abs_diff=float(r.abs().max()), unmeasured=int(sampled.sum()) - int(r.numel()))

    def add(self, other: "AgreementSums") -> "AgreementSums":
        return AgreementSums(self.k3_sum + other.k3_sum, self.tokens + other.tokens,
                             max(self.max_abs_diff, other.max_abs_diff), self.unmeasured + other.unmeasured)


def agreement_metrics(sums: Iterable[AgreementSums]) -> dict[str, float]:
    """The step's metrics from every worker's sums (none when no sampled token was compared)."""
    total = AgreementSums()
    for part in sums:
        total = total.add(part)
    if not total.tokens:
        return {}
    metrics = {"rollout_k3": total.k3_sum / total.tokens, "rollout_logprob_max_abs_diff": total.max_abs_diff}
    if total.unmeasured:
        metrics["rollout_unmeasured_tokens"] = float(total.unmeasured)
    return metrics


class AgreementWarning:
    """Warns once, at the first step whose mean k3 passes the configured bound."""

    def __init__(self, bound: Optional[float]) -> None:
        self.bound = bound
        self.warned = False
        self._last: dict[str, float] = {}

    def measured(self, metrics: dict[str, float]) -> None:
        """Keep a finished optimizer step's metrics until :meth:`check` knows its number."""
        self._last = {k: v for k, v in metrics.items() if k.startswith("rollout_")}

    def check(self, step: int) -> None:
        k3 = self._last.get("rollout_k3")
        if self.bound is None or self.warned or k3 is None or not (k3 > self.bound or math.isnan(k3)):
            return
        self.warned = True
        log.warning("step %d: the rollout engine's log-probabilities are %.3g (k3 KL) from the trainer's, above "
                    "onpolicy.agreement_warn_k3=%g (max |diff| %.3g); the rollouts are off-policy by that much "
                    "(engine numerics or stale weights; see docs/onpolicy.md). Warned once.",
                    step, k3, self.bound, self._last.get("rollout_logprob_max_abs_diff", float("nan")))
