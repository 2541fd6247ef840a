"""The student's log-probability of each loss row's target, taken from the loss engine as it runs.

On-policy steps compare the trainer's log-probability of every sampled token with the one the
rollout engine reported (the rollout-train agreement, :mod:`kdlib.rollout_agreement`); importance
weights need the same numbers. Computing them apart would cost another pass of the student head
over the vocabulary for every loss token; the chunked loss engine already computes the student's
logits chunk by chunk, and at temperature 1 its cross-entropy per row *is* minus that
log-probability. So a caller opens :func:`recording` around a loss computation and the engine
(:mod:`kdlib.losses.engine`) hands every evaluation's rows to the active recorder: the
cross-entropy it computed anyway at temperature 1, or one extra log-softmax of the chunk's logits
at another temperature (no extra matrix product either way). Nothing is recorded, and nothing is
computed, when no recorder is open.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from kdlib.losses.chunk_math import IGNORE_INDEX


@dataclass
class TargetLogprobs:
    """Rows recorded while open: one float32 tensor per engine evaluation, in evaluation order."""

    temperature: float = 1.0
    evaluations: list[torch.Tensor] = field(default_factory=list)

    def rows(self, n_rows: int) -> Optional[torch.Tensor]:
        """The first recorded evaluation covering ``n_rows`` loss rows (the algorithm's student
        rows; an algorithm may evaluate the engine again on other rows), or None."""
        return next((rows for rows in self.evaluations if rows.numel() == n_rows), None)


_ACTIVE: ContextVar[Optional[TargetLogprobs]] = ContextVar("kdlib_target_logprobs", default=None)


@contextmanager
def recording(temperature: float = 1.0) -> Iterator[TargetLogprobs]:
    """Record the target log-probabilities (at ``temperature``) of the engine evaluations inside."""
    recorder = TargetLogprobs(temperature)
    token = _ACTIVE.set(recorder)
    try:
        yield recorder
    finally:
        _ACTIVE.reset(token)


def active() -> Optional[TargetLogprobs]:
    """The open recorder, if any (read by the loss engine)."""
    return _ACTIVE.get()


def observe_logits(logits: torch.Tensor, targets: Optional[torch.Tensor]) -> None:
    """Reference (naive) loss paths: record the rows of full ``logits`` when a recorder is open."""
    recorder = active()
    if recorder is not None and targets is not None:
        recorder.evaluations.append(tempered_target_logprobs(logits, targets.reshape(-1).long(), recorder.temperature))


def tempered_target_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / temperature)[target] per row, float32, NaN where the target is ignored
    (no gradient; one pass over the logits, which are left unchanged)."""
    with torch.no_grad():
        valid = targets != IGNORE_INDEX
        scaled = logits.float() / temperature
        picked = scaled.gather(-1, targets.masked_fill(~valid, 0).unsqueeze(-1)).squeeze(-1)
        return (picked - torch.logsumexp(scaled, dim=-1)).masked_fill(~valid, float("nan"))


def from_cross_entropy(ce_rows: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Minus the per-row cross-entropy (temperature 1), float32, NaN where the target is ignored."""
    return (-ce_rows.detach().float()).masked_fill(targets == IGNORE_INDEX, float("nan"))
