"""Small token batches for teacher-backend tests: three samples of different lengths, padded or packed."""

from __future__ import annotations

import torch

from kdlib.batch import TokenBatch

LENGTHS = (12, 7, 10)


def padded_batch(seed: int = 0, spans: tuple = ((4, 11), (2, 6), (0, 9))) -> TokenBatch:
    """Three right-padded samples of LENGTHS tokens (ids below 380), loss on ``spans`` of each."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 380, (3, max(LENGTHS)), generator=g)
    attention = torch.zeros(3, max(LENGTHS), dtype=torch.long)
    loss = torch.zeros(3, max(LENGTHS), dtype=torch.bool)
    for row, (n, (a, b)) in enumerate(zip(LENGTHS, spans)):
        attention[row, :n] = 1
        loss[row, a:b] = True
    return TokenBatch(ids * attention, attention, loss)


def packed(batch: TokenBatch) -> TokenBatch:
    """The same samples packed into one row (position ids restart per sample)."""
    keep = batch.attention_mask.bool()
    lengths = keep.sum(1).tolist()
    positions = torch.cat([torch.arange(n) for n in lengths])[None]
    return TokenBatch(batch.input_ids[keep][None], None, batch.loss_mask[keep][None], positions)
