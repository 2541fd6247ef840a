"""The few-row matrix products of a decode step, laid out for how CPUs stream weights.

A decode step multiplies a handful of rows (one per sequence) by every weight of the model, so it
is bound by how fast the weights stream from memory, not by arithmetic; these helpers choose the
orientation and the 2D form of those products (the same dot products as ``nn.Linear``).
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from kdlib.models.head import LMHead


def head_logits(head: LMHead, hidden: torch.Tensor, *, transposed: bool) -> torch.Tensor:
    """float32 ``head(hidden)`` for ``hidden`` [batch, H]; ``transposed``: as ``weight @ hidden^T``.

    The same dot products as ``nn.Linear``; on CPU in float32, MKL streams a [V, H] weight several
    times faster in this orientation when the batch is a few rows (docs/benchmarks.md#rollout-decode).
    """
    hidden = hidden.to(head.weight.dtype)
    if transposed:
        logits = torch.mm(head.weight, hidden.t()).t()
        logits = logits if head.bias is None else logits + head.bias
    else:
        logits = nn.functional.linear(hidden, head.weight, head.bias)
    return head.finish(logits).to(dtype=torch.float32, memory_format=torch.contiguous_format)


class FewRowLinears:
    """While active, every ``nn.Linear`` of the decoder computes an input of at most
    :data:`FEW_ROWS` rows as one 2D product; ``transposed``: wide layers as ``weight @ x^T``.

    Wide means ``out_features >= in_features`` and at least :data:`WIDE_MIN_NUMEL` weights: with
    weights streamed from memory and a few rows, MKL runs square and widening float32 products
    faster transposed on CPU, and narrowing ones slower (measured: docs/benchmarks.md). The 2D form
    matters when the step is compiled: inductor lowers a [batch, 1, in] x [in, out] product as a
    batched product with one row per batch and then as its own loops, which read the weight once
    per row. Prefill (many rows) keeps ``nn.Linear``. The forwards are made once, so a compiled
    step sees the same functions on every call.
    """

    def __init__(self, decoder: nn.Module, *, transposed: bool) -> None:
        self._forwards = [
            (module, functools.partial(_few_rows_linear, module, transposed and _is_wide(module)))
            for module in decoder.modules()
            if type(module) is nn.Linear
        ]

    def __enter__(self) -> None:
        for module, forward in self._forwards:
            module.forward = forward

    def __exit__(self, *exc) -> None:
        for module, _ in self._forwards:
            del module.forward


FEW_ROWS = 16
# Smaller weights stay in cache and gain nothing from the orientation.
WIDE_MIN_NUMEL = 1 << 18


def _is_wide(module: nn.Linear) -> bool:
    return module.out_features >= module.in_features and module.weight.numel() >= WIDE_MIN_NUMEL


def _few_rows_linear(module: nn.Linear, transposed: bool, x: torch.Tensor) -> torch.Tensor:
    rows = x.numel() // x.shape[-1]
    if rows > FEW_ROWS:
        return nn.functional.linear(x, module.weight, module.bias)
    flat = x.reshape(rows, x.shape[-1])
    if transposed:
        out = torch.mm(module.weight, flat.t()).t()
        out = out if module.bias is None else out + module.bias
    else:
        out = nn.functional.linear(flat, module.weight, module.bias)
    return out.reshape(*x.shape[:-1], module.out_features)
