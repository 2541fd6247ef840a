"""Splitting work across workers: teacher micro-batches by token count, students by samples.

Teacher micro-batches go largest first to the least-loaded worker (greedy longest-processing-time
scheduling), so workers finish together when sequence lengths vary; the handles come back in the
original order. Student shares are contiguous and nearly equal (see ``split_across_workers``).
"""

from __future__ import annotations

import heapq
from typing import Any, Optional

from kdlib.batch import MicroBatch
from kdlib.launch import WorkerGroup


def assign_by_tokens(costs: list[int], n_workers: int) -> list[list[int]]:
    """Indices of ``costs`` per worker: largest first, each to the least-loaded worker."""
    heap = [(0, rank) for rank in range(n_workers)]
    assignment: list[list[int]] = [[] for _ in range(n_workers)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        assignment[rank].append(index)
        heapq.heappush(heap, (load + costs[index], rank))
    return assignment


def teacher_forward(group: Optional[WorkerGroup], batches: list[MicroBatch]) -> list[Any]:
    """Transport handles of the teacher outputs of ``batches``, in their order (None: no teacher)."""
    if group is None:
        return [None] * len(batches)
    costs = [batch.teacher_view.n_tokens for batch in batches]
    assignment = assign_by_tokens(costs, group.size)
    results = group.call_each("forward", [([batches[i] for i in idx],) for idx in assignment])
    handles: list[Any] = [None] * len(batches)
    for indices, worker_handles in zip(assignment, results):
        for index, handle in zip(indices, worker_handles):
            handles[index] = handle
    return handles
