"""Layer scores judged by the output: the KL from the source's next-token distribution when layers
are dropped, one at a time (drop-one) or greedily, one after another.

Block influence and angular distance look at one layer's input and output; what distillation has
to recover is the change in the model's output distribution. Dropping layer ``l`` leaves layers
``0..l-1`` untouched, so their output (the recorded input of layer ``l``) is replayed instead of
recomputed: the decoder runs with layers before ``l`` replaced by a no-op, layer ``l`` by a module
that returns the recorded residual stream, and only the layers after ``l`` compute. The decoder's
own loop still builds masks and rotary embeddings, so this works for every family whose decoder
iterates a ``layers`` list (Llama, Qwen3, Gemma 3, the VLMs' language models). The greedy search
records the current model's layer inputs once per step and tries each remaining layer the same way.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional, Sequence

import torch
from torch import nn

from kdlib.pruning.calibration import Recording, TextModel


class _Skip(nn.Module):
    """A dropped layer: returns its input."""

    def __init__(self, returns_tuple: bool) -> None:
        super().__init__()
        self.returns_tuple = returns_tuple
        self.value: Optional[torch.Tensor] = None  # set: return this instead (a replayed state)

    def forward(self, *args, **kwargs):
        out = self.value if self.value is not None else (args[0] if args else kwargs["hidden_states"])
        return (out,) if self.returns_tuple else out


@contextmanager
def _layers_replaced(text: TextModel, skipped: set[int], replay_at: Optional[int], returns_tuple: bool) -> Iterator[Optional[_Skip]]:
    """The decoder with layers in ``skipped`` (and all before ``replay_at``) made no-ops and layer
    ``replay_at`` replaced by a replay module (yielded; set its ``value`` before each forward)."""
    original = text.decoder.layers
    replay = _Skip(returns_tuple) if replay_at is not None else None
    modules = []
    for index, layer in enumerate(original):
        if index == replay_at:
            modules.append(replay)
        elif index in skipped or (replay_at is not None and index < replay_at):
            modules.append(_Skip(returns_tuple))
        else:
            modules.append(layer)
    text.decoder.layers = nn.ModuleList(modules)
    try:
        yield replay
    finally:
        text.decoder.layers = original


def _mean_kl(text: TextModel, rows: Sequence[torch.Tensor], reference: Sequence[torch.Tensor],
             replay: Optional[_Skip], replay_values: Optional[Sequence[torch.Tensor]]) -> float:
    """Mean per-token KL(reference || model) over ``rows`` with the decoder as currently patched."""
    total, count = 0.0, 0
    device = next(text.model.parameters()).device
    for index, ids in enumerate(rows):
        if replay is not None:
            replay.value = replay_values[index]
        logits = text.model(input_ids=ids[None].to(device), use_cache=False).logits[0].float()
        log_q = torch.log_softmax(logits, dim=-1)
        log_p = reference[index]
        total += (log_p.exp() * (log_p - log_q)).sum().item()
        count += ids.numel()
    return total / count


@torch.no_grad()
def reference_log_probs(text: TextModel, rows: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The source model's next-token log-probabilities on ``rows`` (the KL's reference)."""
    device = next(text.model.parameters()).device
    return [torch.log_softmax(text.model(input_ids=ids[None].to(device), use_cache=False).logits[0].float(), -1)
            for ids in rows]


@torch.no_grad()
def drop_one_kl(text: TextModel, rec: Recording, reference: Sequence[torch.Tensor]) -> list[float]:
    """Per layer ``l``: mean KL(source || source without layer l) on the recording's KL rows."""
    scores = []
    for drop in range(len(text.layers)):
        with _layers_replaced(text, set(), drop, rec.returns_tuple) as replay:
            values = [inputs[drop] for inputs in rec.layer_inputs]
            scores.append(_mean_kl(text, rec.kl_rows, reference, replay, values))
    return scores


@torch.no_grad()
def greedy_kl(text: TextModel, rec: Recording, reference: Sequence[torch.Tensor], n_drop: int,
              pool: Optional[int] = None, first: Optional[Sequence[float]] = None) -> tuple[list[int], list[float]]:
    """Drop ``n_drop`` layers one by one, each time the layer whose removal from the current model
    gives the lowest KL to the source; returns the dropped layers in order and the KL after each.

    ``pool`` (with ``first``, the drop-one scores) limits each step's candidates to the ``pool``
    remaining layers of lowest drop-one KL, which bounds the cost at ``n_drop * pool`` partial
    forward passes instead of about ``n_drop * L``.
    """
    n_layers = len(text.layers)
    dropped: list[int] = []
    trajectory: list[float] = []
    for _ in range(n_drop):
        inputs = _current_inputs(text, rec, set(dropped))
        remaining = [i for i in range(n_layers) if i not in dropped]
        if pool is not None and first is not None:
            remaining = sorted(remaining, key=lambda i: first[i])[:pool]
        best, best_kl = None, float("inf")
        for candidate in remaining:
            with _layers_replaced(text, set(dropped), candidate, rec.returns_tuple) as replay:
                kl = _mean_kl(text, rec.kl_rows, reference, replay, [row[candidate] for row in inputs])
            if kl < best_kl:
                best, best_kl = candidate, kl
        dropped.append(best)
        trajectory.append(best_kl)
    return dropped, trajectory


def _current_inputs(text: TextModel, rec: Recording, dropped: set[int]) -> list[list[torch.Tensor]]:
    """Per KL row, the input of every layer of the source with ``dropped`` layers removed."""
    if not dropped:
        return rec.layer_inputs
    device = next(text.model.parameters()).device
    out = []
    for ids in rec.kl_rows:
        states: list[Optional[torch.Tensor]] = [None] * len(text.layers)
        handles = []
        with _layers_replaced(text, dropped, None, rec.returns_tuple):
            for index, layer in enumerate(text.decoder.layers):
                def hook(module, args, kwargs, index=index):
                    states[index] = (args[0] if args else kwargs["hidden_states"]).clone()
                handles.append(layer.register_forward_pre_hook(hook, with_kwargs=True))
            try:
                text.model(input_ids=ids[None].to(device), use_cache=False)
            finally:
                for handle in handles:
                    handle.remove()
        out.append(states)
    return out
