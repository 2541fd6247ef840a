"""Chunked evaluation of a cross-tokenizer loss: O(chunk x vocab) memory, exact gradients.

The cross-tokenizer methods compare distributions that are not token-by-token (sorted
probabilities, products along a group, projections between hidden spaces), so their gradients come
from autograd on each method's formula rather than from closed forms. Running autograd on the whole
micro-batch would keep several [tokens, vocab] tensors alive; here the student's loss rows are cut
into chunks that never split a group, and for each chunk the forward pass recomputes both sides'
logits from hidden states, evaluates the method's KD sum and the CE sum, and immediately
differentiates them with respect to the chunk's student hidden states and the trainable
parameters (student head, bias, projectors). The gradients are accumulated (parameters in float32,
or float64 for float64 inputs) and stored; backward only scales them. Peak memory is one chunk's
logits and their autograd buffers, plus one gradient per parameter, which training needs anyway.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch.autograd.function import once_differentiable

from kdlib.losses.fused import _graph_is_kept
from kdlib.xtok.groups import GroupRows

# compute(chunk, student_hidden_rows, *params) -> (kd_sum, ce_sum), scalars with autograd.
ChunkFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Chunk:
    """Student loss rows ``rows``, the units whose student rows lie in them, and their teacher rows."""

    rows: slice
    units: slice
    teacher: slice


def plan_chunks(groups: GroupRows, n_rows: int, chunk_size: int) -> list[Chunk]:
    """Cut [0, n_rows) into chunks of at most ``chunk_size`` student rows and at most
    ``chunk_size`` teacher rows, never inside a unit.

    A unit longer than ``chunk_size`` on either side gets a chunk of its own. Rows outside every
    unit (CE only) belong to whichever chunk covers them.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    starts = groups.student_start.tolist()
    ends = (groups.student_start + groups.student_len).tolist()
    t_starts = groups.teacher_start.tolist()
    t_ends = (groups.teacher_start + groups.teacher_len).tolist()
    chunks = []
    lo = unit = 0
    while lo < n_rows:
        hi = min(lo + chunk_size, n_rows)
        first = unit
        while unit < len(starts) and starts[unit] < hi:
            too_long = ends[unit] > hi or (unit > first and t_ends[unit] - t_starts[first] > chunk_size)
            if too_long:
                if starts[unit] > lo:  # cut before this unit
                    hi = starts[unit]
                    break
                hi = ends[unit]  # a unit longer than a chunk, at the chunk's start: take it whole
            unit += 1
        teacher = slice(t_starts[first], t_ends[unit - 1]) if unit > first else slice(0, 0)
        chunks.append(Chunk(rows=slice(lo, hi), units=slice(first, unit), teacher=teacher))
        lo = hi
    return chunks


def chunked_loss(
    compute: ChunkFn,
    chunks: Sequence[Chunk],
    hidden: torch.Tensor,
    params: Sequence[Optional[torch.Tensor]],
    *,
    kd_weight: float,
    ce_weight: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight * KD + ce_weight * CE, KD, CE) summed over ``chunks``; the first is differentiable
    with respect to ``hidden`` and ``params`` (None entries are skipped)."""
    spec = (compute, tuple(chunks), float(kd_weight), float(ce_weight))
    tracked = [hidden, *[p for p in params if p is not None]]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tracked):
        return _ChunkedLoss.apply(spec, hidden, *params)
    with torch.no_grad():
        total, kd, ce, _ = _run(spec, hidden, params, (False,) * (len(params) + 1))
    return total, kd, ce


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, spec, hidden, *params):
        total, kd, ce, grads = _run(spec, hidden, params, tuple(ctx.needs_input_grad[1:]))
        ctx.grads = grads
        ctx.mark_non_differentiable(kd, ce)
        return total, kd, ce

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the cross-tokenizer loss was already differentiated without retain_graph")
        if _graph_is_kept():  # another backward may follow: scale copies
            return (None, *(None if g is None else g * grad_total.to(g.dtype) for g in grads))
        ctx.grads = None  # last use: scale in place, so each [V, H] gradient exists once
        for g in grads:
            if g is not None:
                g.mul_(grad_total.to(g.dtype))
        return (None, *grads)


def _run(spec, hidden, params, needs):
    compute, chunks, kd_weight, ce_weight = spec
    acc = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    zero = torch.zeros((), dtype=acc, device=hidden.device)
    kd_total, ce_total = zero.clone(), zero.clone()
    need_h, need_p = needs[0], needs[1:]
    grad_h = torch.zeros_like(hidden) if need_h else None
    grad_p: list[Optional[torch.Tensor]] = [None] * len(params)
    for chunk in chunks:
        h = hidden[chunk.rows].detach().requires_grad_(need_h)
        leaves = [
            None if p is None else p.detach().requires_grad_(bool(n)) for p, n in zip(params, need_p)
        ]
        with torch.enable_grad():
            kd, ce = compute(chunk, h, *leaves)
            total = kd_weight * kd + ce_weight * ce
        kd_total += kd.detach().to(acc)
        ce_total += ce.detach().to(acc)
        wanted = [t for t, n in zip([h, *leaves], needs) if n and t is not None]
        if not wanted or not total.requires_grad:
            continue
        grads = iter(torch.autograd.grad(total, wanted, allow_unused=True))
        if need_h:
            g = next(grads)
            if g is not None:
                grad_h[chunk.rows] = g
        for k, (p, n) in enumerate(zip(leaves, need_p)):
            if not n or p is None:
                continue
            g = next(grads)
            if g is not None:
                grad_p[k] = g.to(acc) if grad_p[k] is None else grad_p[k].add_(g.to(acc))
    grads = [grad_h]
    for p, g, n in zip(params, grad_p, need_p):
        if not n or p is None:
            grads.append(None)
        else:
            grads.append(torch.zeros_like(p) if g is None else g.to(p.dtype))
    total = kd_weight * kd_total + ce_weight * ce_total
    return total, kd_total, ce_total, grads
