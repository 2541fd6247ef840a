"""Moving weights between model copies: buckets for transport, copy or EMA on arrival.

On-policy KD pushes the student's weights to the rollout engine after every optimizer step, and
self-distillation refreshes (or averages) the teacher from the student. The sender splits its full
state dict into buckets of about ``bucket_bytes`` (so no single message holds a whole large model);
the receiver applies each bucket in place, either as a copy or as an exponential moving average
``target = decay * target + (1 - decay) * source``. Names must match exactly: a mismatch means the
two copies are not the same architecture, which is an error, not something to skip.
"""

from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch import nn


def state_buckets(state: dict[str, torch.Tensor], bucket_bytes: int) -> Iterator[dict[str, torch.Tensor]]:
    """Consecutive sub-dicts of ``state`` of at most ``bucket_bytes`` (a larger tensor goes alone)."""
    bucket: dict[str, torch.Tensor] = {}
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = {}, 0
        bucket[name] = tensor
        size += nbytes
    if bucket:
        yield bucket


def distinct_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with each tensor once (tied weights appear under several names; the first name
    is kept, which :func:`apply_state` restores into every name sharing it), contiguous on the CPU."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor.detach().to("cpu").contiguous()
    return out


@torch.no_grad()
def apply_state(model: nn.Module, bucket: dict[str, torch.Tensor], *, ema_decay: Optional[float] = None) -> None:
    """Copy ``bucket`` into ``model``'s parameters and buffers (or average it in with ``ema_decay``)."""
    own = dict(model.state_dict(keep_vars=True))
    unknown = sorted(set(bucket) - set(own))
    if unknown:
        raise KeyError(f"weights {unknown[:3]}{'...' if len(unknown) > 3 else ''} do not exist in the receiving model")
    seen: set[int] = set()
    for name, value in bucket.items():
        target = own[name]
        if id(target) in seen:  # tied weights arrive under two names; update them once
            continue
        seen.add(id(target))
        if target.shape != value.shape:
            raise ValueError(f"weight {name}: shape {tuple(value.shape)} does not fit {tuple(target.shape)}")
        value = value.to(device=target.device, dtype=target.dtype)
        if ema_decay is None:
            target.copy_(value)
        else:
            target.mul_(ema_decay).add_(value, alpha=1.0 - ema_decay)
