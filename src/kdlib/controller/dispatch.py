"""Splitting work across workers: teacher micro-batches by token count, students by samples.

Teacher micro-batches go largest first to the least-loaded worker (greedy longest-processing-time
scheduling), so workers finish together when sequence lengths vary; the handles come back in the
original order. ``submit_teacher`` starts the work and returns at once (Ray futures), so the
controller can score the next global batch while the students train on this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from kdlib.batch import MicroBatch
from kdlib.data.batching import assign_by_cost
from kdlib.launch import WorkerGroup


@dataclass
class TeacherJob:
    """Teacher work in flight: which worker scores which micro-batch, and its futures."""

    assignment: list[list[int]]
    futures: list[Any]
    n_batches: int


def submit_teacher(group: Optional[WorkerGroup], batches: list[MicroBatch]) -> Optional[TeacherJob]:
    """Start scoring ``batches`` (largest first to the least-loaded worker); None without a teacher."""
    if group is None:
        return None
    costs = [batch.teacher_view.n_tokens for batch in batches]
    assignment = assign_by_cost(costs, group.size)
    futures = group.submit_each("forward", [([batches[i] for i in idx],) for idx in assignment])
    return TeacherJob(assignment=assignment, futures=futures, n_batches=len(batches))


@dataclass
class TeacherOutputs:
    """The collected result of a job: handles in micro-batch order, and the busiest worker's time."""

    handles: list[Any]
    seconds: float = 0.0
    published_bytes: int = 0


def collect_teacher(group: Optional[WorkerGroup], job: Optional[TeacherJob], n_batches: int) -> TeacherOutputs:
    """The transport handles of a submitted job, in the order of its micro-batches."""
    if group is None or job is None:
        return TeacherOutputs([None] * n_batches)
    results = group.gather(job.futures, "forward")
    handles: list[Any] = [None] * job.n_batches
    for indices, result in zip(job.assignment, results):
        for index, handle in zip(indices, result.handles):
            handles[index] = handle
    return TeacherOutputs(
        handles,
        seconds=max(r.seconds for r in results),
        published_bytes=sum(r.published_bytes for r in results),
    )


def teacher_forward(group: Optional[WorkerGroup], batches: list[MicroBatch]) -> list[Any]:
    """Transport handles of the teacher outputs of ``batches``, in their order (None: no teacher)."""
    return collect_teacher(group, submit_teacher(group, batches), len(batches)).handles
