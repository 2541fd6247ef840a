"""What the teacher sends per loss position: its hidden state, its top-k, or tokens sampled from it.

The default, ``hidden``, is exact: the student recomputes the teacher's whole distribution from the
post-norm hidden state and the teacher's head. A teacher kdlib does not run (a served model behind
an OpenAI-compatible API) can only send what its server returns, the ``topk`` log-probabilities of
each position; a cache can be made smaller by storing a few ``sampled`` tokens per position
instead (RS-KD, Anshumann et al., ACL 2025). Each sparse signal comes with an estimator of every
divergence it supports (:mod:`kdlib.losses.estimators`); docs/teacher_signals.md measures what each
costs and loses.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from kdlib.config.node import ConfigNode


class SignalKind(str, Enum):
    """What a teacher sends for each loss position."""

    # post-norm last-layer hidden states (exact: the student recomputes every logit)
    hidden = "hidden"
    # the k most probable token ids and their log-probabilities (and the mass outside them)
    topk = "topk"
    # k tokens drawn from the teacher per position, with their log-probabilities (RS-KD)
    sampled = "sampled"


@dataclass
class SignalConfig(ConfigNode):
    """teacher.signal: what the teacher sends, and how much of it."""

    # hidden | topk | sampled (see SignalKind).
    kind: SignalKind = SignalKind.hidden
    # topk: token ids per position; sampled: draws per position (with replacement). RS-KD's
    # paper recommends about 12 draws.
    k: int = 12
    # topk: also send the teacher's probability mass outside its top k (the tail bucket); false
    # renormalises the top k (a truncated teacher).
    tail_mass: bool = True
    # sampled: draw from the teacher's distribution at this temperature (1: the teacher itself,
    # every draw weighing 1/k); the importance weights p/q make the estimate unbiased either way.
    proposal_temperature: float = 1.0
    # sampled: seed of the draws; a sample's draws depend only on this seed and its tokens, so a
    # teacher cache and a live teacher draw the same ones.
    seed: int = 0

    @property
    def sparse(self) -> bool:
        return self.kind is not SignalKind.hidden

    def describe(self) -> str:
        """One word for messages, summaries and the cache manifest (``topk k=32 tail``)."""
        kind = SignalKind(self.kind)
        if kind is SignalKind.hidden:
            return "hidden"
        if kind is SignalKind.topk:
            return f"topk k={self.k} {'tail' if self.tail_mass else 'no-tail'}"
        return f"sampled k={self.k} proposal_temperature={self.proposal_temperature:g} seed={self.seed}"

    def check(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1, got {self.k}")
        if self.proposal_temperature <= 0:
            raise ValueError(f"proposal_temperature must be > 0, got {self.proposal_temperature}")
