"""The route of a sample and of a micro-batch when a run has several teachers.

A sample goes to one *target*: a teacher, or an ensemble of teachers (docs/multi_teacher.md). Its
own teacher fields (``Sample.teacher``, ``alignment``, ...) are the view of the target's first
teacher, exactly as in a one-teacher run with that teacher; :class:`SampleRoute` adds the target's
name and, for an ensemble, the sample as each other member reads it (its tokens, its alignment)
and the members' weights. A micro-batch holds the samples of one target
(:class:`BatchRoute`): the teacher group of its first teacher scores the micro-batch itself, each
other member scores its own view of the same samples, and the student receives one teacher output
per member (:class:`MemberHandles` while they travel). A micro-batch may also hold the samples of
several targets (:class:`MixedRoute`): the student runs one forward over all of them, and each
*part* (the samples of one target, collated as a one-target micro-batch of its own) is scored by
its target's teachers and trained with its target's loss on its own rows; its teacher outputs
travel as :class:`PartHandles`. These types know nothing of configs or workers; they are what
travels.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Optional, Union

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


@dataclass
class MixedRoute:
    """Where a micro-batch of several targets goes: each part (the samples of one target, in the
    micro-batch's sample order) as a one-target micro-batch with its :class:`BatchRoute`. The
    micro-batch's own student tokens are the parts' student tokens in that order, so the student's
    loss rows of part i follow those of part i - 1."""

    parts: list["MicroBatch"]

    @property
    def targets(self) -> list[str]:
        return [part.route.target for part in self.parts]

    def to(self, device: torch.device | str) -> "MixedRoute":
        return MixedRoute([part.to(device) for part in self.parts])


@dataclass
class PartHandles:
    """The teacher outputs of a :class:`MixedRoute` micro-batch while they travel: one handle (or
    :class:`MemberHandles`) per part, in part order."""

    handles: list[Any]


Route = Union[BatchRoute, MixedRoute]


def route_parts(batch: "MicroBatch") -> list["MicroBatch"]:
    """The one-target micro-batches of a routed ``batch``: its parts, or the batch itself."""
    return list(batch.route.parts) if isinstance(batch.route, MixedRoute) else [batch]


def split_parts(batches: list["MicroBatch"], handles: Optional[list[Any]] = None) -> tuple[list["MicroBatch"], list[Any]]:
    """Every one-target micro-batch of ``batches`` in order, and (given the batches' handles) the
    handle of each (:class:`PartHandles` opened)."""
    parts = [part for batch in batches for part in route_parts(batch)]
    if handles is None:
        return parts, []
    flat = [h for handle in handles for h in (handle.handles if isinstance(handle, PartHandles) else [handle])]
    if len(flat) != len(parts):
        raise ValueError(f"{len(flat)} teacher handles for {len(parts)} micro-batch parts")
    return parts, flat


def per_batch(batches: list["MicroBatch"], flat: list[Any]) -> list[list[Any]]:
    """Items given per part (in :func:`split_parts` order) grouped per micro-batch of ``batches``."""
    out, start = [], 0
    for batch in batches:
        n = len(route_parts(batch))
        out.append(flat[start:start + n])
        start += n
    if start != len(flat):
        raise ValueError(f"{len(flat)} items for {start} micro-batch parts")
    return out


def join_handles(batches: list["MicroBatch"], flat: list[Any]) -> list[Any]:
    """The handles of ``batches`` from the handles of their parts (``split_parts`` undone)."""
    return [PartHandles(group) if isinstance(batch.route, MixedRoute) else group[0]
            for batch, group in zip(batches, per_batch(batches, flat))]
