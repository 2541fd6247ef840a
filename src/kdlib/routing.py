"""The route of a sample and of a micro-batch when a run has several teachers.

A sample goes to one *target*: a teacher, or an ensemble of teachers (docs/multi_teacher.md). Its
own teacher fields (``Sample.teacher``, ``alignment``, ...) are the view of the target's first
teacher, exactly as in a one-teacher run with that teacher; :class:`SampleRoute` adds the target's
name and, for an ensemble, the sample as each other member reads it (its tokens, its alignment)
and the members' weights. A micro-batch holds the samples of one target
(:class:`BatchRoute`): the teacher group of its first teacher scores the micro-batch itself, each
other member scores its own view of the same samples, and the student receives one teacher output
per member (:class:`MemberHandles` while they travel). These types know nothing of configs or
workers; they are what travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional

import torch

if TYPE_CHECKING:
    from kdlib.batch import MicroBatch
    from kdlib.data.samples import Sample


@dataclass
class SampleRoute:
    """Where one sample goes: its target and, for an ensemble, the other members' views."""

    target: str  # the teacher or ensemble the sample is routed to
    members: tuple[str, ...]  # the target's teachers; the sample's own fields are members[0]'s view
    # The sample as each other member reads it (an ensemble's members 1..n).
    others: dict[str, "Sample"] = field(default_factory=dict)
    # The members' weights for this sample (sum 1), or None for a single teacher.
    weights: Optional[tuple[float, ...]] = None

    @property
    def teacher(self) -> str:
        return self.members[0]


@dataclass
class BatchRoute:
    """Where a micro-batch goes: one target, a view per other member, per-sample weights."""

    target: str
    members: tuple[str, ...]
    # The micro-batch as each other member reads it (same student tokens, its own teacher tokens).
    others: dict[str, "MicroBatch"] = field(default_factory=dict)
    # [n_samples, members] weights (rows sum to 1) of an ensemble, None for a single teacher.
    weights: Optional[torch.Tensor] = None
    # How an ensemble combines its members (a kdlib.config.teachers.Combine value).
    combine: str = "mixture"

    @property
    def teacher(self) -> str:
        return self.members[0]

    @property
    def is_ensemble(self) -> bool:
        return len(self.members) > 1

    def view(self, batch: "MicroBatch", member: str) -> "MicroBatch":
        """The micro-batch ``batch`` (whose route this is) as ``member`` reads it."""
        return batch if member == self.members[0] else self.others[member]

    def to(self, device: torch.device | str) -> "BatchRoute":
        return replace(
            self, others={name: batch.to(device) for name, batch in self.others.items()},
            weights=None if self.weights is None else self.weights.to(device),
        )


@dataclass
class MemberHandles:
    """The teacher outputs of an ensemble's micro-batch while they travel: one transport or cache
    handle per member, by name (the student fetches each)."""

    handles: dict[str, Any]
