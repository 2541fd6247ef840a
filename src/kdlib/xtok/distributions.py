"""Distributions over a group of tokens, and the sorted-probability distance of ULD.

A group of several tokens on one side predicts its text in several steps. GOLD (TRL) merges them
by the chain rule: the full distribution at the group's first row, times the probabilities each
later row gives to the token actually there,

    merged(v) = P(v | prefix) * prod_{k > first} P(x_k | prefix, x_first..x_{k-1}),

so merged(x_first) is the joint probability of the group's actual tokens; the other entries keep
their first-row probability, scaled by the same product (the model's probability of the
continuation after another first token is unknown). The vector sums to that product c <= 1.
Everything is computed in log space: ``log merged = log_softmax(first row) + log c``.

ULD (Boizard et al. 2024) compares two distributions over different vocabularies by sorting each
in decreasing order, zero-padding the shorter to the longer, and summing absolute differences.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_NEG_INF = float("-inf")


def merged_log_probs(
    log_probs: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, length: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log merged [U, V], log c [U]) of units whose rows are ``[start[u], start[u] + length[u])``.

    ``log_probs`` [rows, V] are each row's log-probabilities, ``ids`` [rows] the token each row
    predicts (the token actually there). Units of one row have log c = 0 exactly.
    """
    first = log_probs[start]
    later_count = length - 1
    total = int(later_count.sum())
    unit = torch.repeat_interleave(torch.arange(start.shape[0], device=start.device), later_count, output_size=total)
    offset = torch.arange(total, device=start.device) - torch.repeat_interleave(
        torch.cumsum(later_count, 0) - later_count, later_count, output_size=total
    )
    rows = start[unit] + 1 + offset
    factors = log_probs[rows, ids[rows]]
    log_c = torch.zeros(start.shape[0], dtype=log_probs.dtype, device=log_probs.device)
    log_c = log_c.index_add(0, unit, factors)
    return first + log_c.unsqueeze(-1), log_c


def group_log_probs(
    logits: torch.Tensor, ids: torch.Tensor, start: torch.Tensor, length: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(log merged [U, V], log c [U], first-row log-probs [U, V]) from logits at temperature T."""
    log_probs = F.log_softmax(logits / temperature, -1)
    merged, log_c = merged_log_probs(log_probs, ids, start, length)
    return merged, log_c, log_probs[start]


def sorted_l1(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Per row, sum_k |sort(p)_k - sort(q)_k| with both sorted descending and zero-padded.

    ``p`` [N, Vp] and ``q`` [N, Vq] hold non-negative values (probabilities). Against zero padding
    the larger side's entries beyond the shorter length contribute themselves, in any order, so
    only the k = min(Vp, Vq) largest entries of each side need sorting (``topk``: 6x faster than a
    full sort for 4k of 49k entries) and the rest is summed as it is (ties at the cut give the
    same value whichever entry is taken).
    """
    k = min(p.shape[-1], q.shape[-1])
    a, a_index = p.topk(k, -1)
    b, b_index = q.topk(k, -1)
    return (a - b).abs().sum(-1) + _sum_outside(p, a_index) + _sum_outside(q, b_index)


def _sum_outside(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Row sums of ``x`` over the entries not in ``index`` (exact: no subtraction of sums)."""
    if index.shape[-1] == x.shape[-1]:
        return x.new_zeros(x.shape[:-1])
    outside = torch.ones_like(x, dtype=torch.bool).scatter_(-1, index, False)
    return (x * outside).sum(-1)


def logaddexp_safe(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """log(exp(a) + exp(b)), -inf where both are -inf, with zero (not NaN) gradients there."""
    both = (a == _NEG_INF) & (b == _NEG_INF)
    out = torch.logaddexp(a.masked_fill(both, 0.0), b.masked_fill(both, 0.0))
    return out.masked_fill(both, _NEG_INF)


def log1mexp_safe(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0: -inf at x = 0, with a zero (not infinite) gradient there."""
    inside = x < 0
    safe = torch.where(inside, x, torch.full_like(x, -1.0))
    return torch.where(inside, torch.log(-torch.expm1(safe)), torch.full_like(x, _NEG_INF))


def logsumexp_or_neg_inf(x: torch.Tensor) -> torch.Tensor:
    """Row logsumexp, -inf for rows with no entries."""
    if x.shape[-1] == 0:
        return x.new_full(x.shape[:-1], _NEG_INF)
    return torch.logsumexp(x, -1)
