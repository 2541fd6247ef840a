"""Samples -> global batches -> a per-worker plan of micro-batches -> padded or packed tensors.

A global batch is what one optimizer step consumes. :func:`plan_step` splits it across the
data-parallel student workers and into micro-batches, either by count (``train.micro_batch_size``)
or by a token budget (``train.max_tokens_per_micro_batch``: dynamic batch size, samples balanced
across workers by tokens). Every sample lands in exactly one micro-batch. Because the workers of a
sharded student must run the same number of forward/backward passes, a worker with fewer
micro-batches gets weight-0 copies of one of its own (they keep the collectives in step and
contribute nothing); the plan counts them. The order of samples is a seeded shuffle per epoch.
"""

from __future__ import annotations

import heapq
import math
import itertools
import random
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch

from kdlib.batch import MicroBatch, TokenBatch
from kdlib.data.samples import Sample, Sequence
from kdlib.xtok.groups import AlignmentBatch, RowKind


def global_batches(
    samples: list[Sample],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    epochs: Optional[int] = None,
) -> Iterator[list[Sample]]:
    """Global batches over ``epochs`` passes (None: without end); the last batch of an epoch may
    be smaller. Epoch e is shuffled with seed ``seed + e``."""
    for epoch in range(epochs) if epochs is not None else itertools.count():
        order = list(range(len(samples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [samples[i] for i in order[start : start + batch_size]]


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return -(-n_samples // batch_size)


def split_across_workers(batch: list, n_workers: int) -> list[list]:
    """Contiguous, near-equal shares (sizes differ by at most one); nothing is dropped."""
    base, extra = divmod(len(batch), n_workers)
    shares, start = [], 0
    for rank in range(n_workers):
        size = base + (1 if rank < extra else 0)
        shares.append(batch[start : start + size])
        start += size
    return shares


def even_shares(items: list, n_workers: int) -> list[list[tuple[object, float]]]:
    """Near-equal contiguous shares as (item, weight) pairs, padded with weight-0 copies so every
    worker gets the same number of items (the ranks of a sharded model run in lockstep)."""
    shares = split_across_workers(items, n_workers)
    longest = max(len(share) for share in shares)
    out = []
    for share in shares:
        filler = share[0] if share else items[0]
        out.append([(item, 1.0) for item in share] + [(filler, 0.0)] * (longest - len(share)))
    return out


def assign_by_cost(costs: list[int], n_workers: int) -> list[list[int]]:
    """Indices of ``costs`` per worker: largest first, each to the least-loaded worker (LPT)."""
    heap = [(0, rank) for rank in range(n_workers)]
    assignment: list[list[int]] = [[] for _ in range(n_workers)]
    for index in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(heap)
        assignment[rank].append(index)
        heapq.heappush(heap, (load + costs[index], rank))
    return assignment


def micro_batches(samples: list, size: int) -> list[list]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def token_budget_batches(samples: list[Sample], max_tokens: int, *, packing: bool) -> list[list[Sample]]:
    """Micro-batches of at most ``max_tokens`` tokens each (padded: rows x longest; packed: the sum),
    longest samples first; a sample longer than the budget gets a micro-batch of its own."""
    ordered = sorted(samples, key=lambda s: -len(s.student))
    batches: list[list[Sample]] = []
    current: list[Sample] = []
    for sample in ordered:
        candidate = current + [sample]
        cost = sum(len(s.student) for s in candidate) if packing else len(candidate) * len(candidate[0].student)
        if current and cost > max_tokens:
            batches.append(current)
            candidate = [sample]
        current = candidate
    if current:
        batches.append(current)
    return batches


@dataclass
class StepPlan:
    """The micro-batches of one global batch and which worker runs which."""

    # Distinct micro-batches: each is collated once and scored by the teacher once.
    micro_batches: list[list[Sample]]
    # Per worker: (index into micro_batches, weight); weight 0 marks a padding copy.
    per_worker: list[list[tuple[int, float]]] = field(default_factory=list)

    @property
    def padding(self) -> int:
        return sum(1 for entries in self.per_worker for _, w in entries if w == 0.0)


def plan_step(
    batch: list[Sample],
    n_workers: int,
    *,
    micro_batch_size: int,
    max_tokens: Optional[int] = None,
    packing: bool = False,
) -> StepPlan:
    """Split a global batch over ``n_workers`` and into micro-batches, padded to equal counts."""
    if max_tokens:
        assignment = assign_by_cost([len(s.student) for s in batch], n_workers)
        shares = [[batch[i] for i in sorted(idx)] for idx in assignment]
        per_share = [token_budget_batches(share, max_tokens, packing=packing) for share in shares]
    else:
        shares = split_across_workers(batch, n_workers)
        per_share = [micro_batches(share, micro_batch_size) for share in shares]
    plan = StepPlan(micro_batches=[])
    for worker_batches in per_share:
        entries = []
        for samples in worker_batches:
            entries.append((len(plan.micro_batches), 1.0))
            plan.micro_batches.append(samples)
        plan.per_worker.append(entries)
    longest = max(len(entries) for entries in plan.per_worker)
    for entries in plan.per_worker:
        source = entries[0][0] if entries else 0  # an empty share borrows worker 0's first batch
        entries.extend((source, 0.0) for _ in range(longest - len(entries)))
    return plan


def collate(
    samples: list[Sample],
    *,
    student_pad_id: int,
    teacher_pad_id: Optional[int] = None,
    packing: bool = False,
    row_kind: Optional[RowKind] = None,
) -> MicroBatch:
    """Tensors for the student and, when it has its own tokens, the teacher: right-padded rows, or
    one packed row without padding. Samples with an alignment give the batch its groups (rows in
    the same (sample, position) order, padded or packed); ``row_kind`` then names the teacher rows
    the algorithm reads, the only ones the teacher sends (None: all its loss rows)."""
    build = _pack if packing else (lambda seqs, pad: _pad(seqs, pad))
    student = build([s.student for s in samples], student_pad_id)
    teacher = None
    if samples and samples[0].teacher is not None:
        assert teacher_pad_id is not None, "teacher sequences need the teacher pad id"
        teacher = build([s.teacher for s in samples], teacher_pad_id)
    keys = [s.teacher_key() for s in samples] if samples and all(s.cacheable for s in samples) else None
    batch = MicroBatch(
        student=student, teacher=teacher, sample_ids=[s.index for s in samples], teacher_keys=keys,
        response_bytes=torch.tensor([s.response_bytes for s in samples], dtype=torch.long),
    )
    if any(s.teacher_response_bytes is not None for s in samples):
        batch.teacher_response_bytes = torch.tensor(
            [s.response_bytes if s.teacher_response_bytes is None else s.teacher_response_bytes for s in samples],
            dtype=torch.long,
        )
    if samples and any(s.advantage is not None for s in samples):
        batch.advantages = per_token_advantages(samples)
    if any(s.rollout_logprobs is not None for s in samples):
        batch.rollout_logprobs = torch.tensor(
            [lp for s in samples for lp in (s.rollout_logprobs or [math.nan] * s.student.n_loss_tokens)],
            dtype=torch.float32,
        )
    if samples and samples[0].alignment is not None:
        batch.alignment = AlignmentBatch.from_samples([s.alignment for s in samples])
        if row_kind is not None:
            batch.teacher_rows = batch.alignment.rows(row_kind).teacher_rows
    return batch


def per_token_advantages(samples: list[Sample]) -> torch.Tensor:
    """float32 [n_loss_tokens]: each sample's advantage on each of its loss rows, in loss-row order
    (samples in order, padded or packed alike); a sample without one (None) contributes 0."""
    values = torch.tensor([0.0 if s.advantage is None else s.advantage for s in samples], dtype=torch.float32)
    counts = torch.tensor([s.student.n_loss_tokens for s in samples], dtype=torch.long)
    return torch.repeat_interleave(values, counts)


def _pad(sequences: list[Sequence], pad_id: int) -> TokenBatch:
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    attention = torch.zeros((len(sequences), length), dtype=torch.long)
    loss = torch.zeros((len(sequences), length), dtype=torch.bool)
    for row, seq in enumerate(sequences):
        n = len(seq)
        ids[row, :n] = torch.tensor(seq.input_ids, dtype=torch.long)
        attention[row, :n] = 1
        # position t predicts token t + 1: the positions before each response token
        loss[row, seq.response_start - 1 : n - 1] = True
    return TokenBatch(input_ids=ids, attention_mask=attention, loss_mask=loss)


def _pack(sequences: list[Sequence], pad_id: int) -> TokenBatch:
    total = sum(len(s) for s in sequences)
    ids = torch.empty((1, total), dtype=torch.long)
    positions = torch.empty((1, total), dtype=torch.long)
    loss = torch.zeros((1, total), dtype=torch.bool)
    offset = 0
    for seq in sequences:
        n = len(seq)
        ids[0, offset : offset + n] = torch.tensor(seq.input_ids, dtype=torch.long)
        positions[0, offset : offset + n] = torch.arange(n)
        # never the last position of a sequence: its next token belongs to the next sequence
        loss[0, offset + seq.response_start - 1 : offset + n - 1] = True
        offset += n
    return TokenBatch(input_ids=ids, attention_mask=None, loss_mask=loss, position_ids=positions)
