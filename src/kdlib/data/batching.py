"""Samples -> global batches -> per-worker micro-batches of padded tensors.

A global batch is what one optimizer step consumes. It is split first across data-parallel
student workers, then into micro-batches of at most ``train.micro_batch_size`` samples; every
sample of the global batch lands in exactly one micro-batch. The order of samples is a seeded
shuffle per epoch, so two runs with the same seed see the same batches.
"""

from __future__ import annotations

import random
from typing import Iterator, Optional

import torch

from kdlib.batch import MicroBatch, TokenBatch
from kdlib.data.samples import Sample, Sequence


def global_batches(
    samples: list[Sample],
    *,
    batch_size: int,
    epochs: int,
    shuffle: bool,
    seed: int,
) -> Iterator[list[Sample]]:
    """Global batches over ``epochs`` passes; the last batch of an epoch may be smaller."""
    for epoch in range(epochs):
        order = list(range(len(samples)))
        if shuffle:
            random.Random(seed + epoch).shuffle(order)
        for start in range(0, len(order), batch_size):
            yield [samples[i] for i in order[start : start + batch_size]]


def steps_per_epoch(n_samples: int, batch_size: int) -> int:
    return -(-n_samples // batch_size)


def split_across_workers(batch: list[Sample], n_workers: int) -> list[list[Sample]]:
    """Contiguous, near-equal shares (sizes differ by at most one); nothing is dropped."""
    base, extra = divmod(len(batch), n_workers)
    shares, start = [], 0
    for rank in range(n_workers):
        size = base + (1 if rank < extra else 0)
        shares.append(batch[start : start + size])
        start += size
    return shares


def micro_batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    return [samples[i : i + size] for i in range(0, len(samples), size)]


def collate(samples: list[Sample], *, student_pad_id: int, teacher_pad_id: Optional[int] = None) -> MicroBatch:
    """Right-padded tensors for the student and, when it has its own tokens, the teacher."""
    student = _pad([s.student for s in samples], student_pad_id)
    teacher = None
    if samples and samples[0].teacher is not None:
        assert teacher_pad_id is not None, "teacher sequences need the teacher pad id"
        teacher = _pad([s.teacher for s in samples], teacher_pad_id)
    return MicroBatch(student=student, teacher=teacher, sample_ids=[s.index for s in samples])


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
