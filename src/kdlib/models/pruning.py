"""Depth pruning: a student made of a subset of the teacher's decoder layers.

Dropping layers and then distilling to recover what they knew is a standard way to build a small
student (Minitron; "The Unreasonable Ineffectiveness of the Deeper Layers"). The kept layers keep
their weights; embeddings, final norm and head are shared with the source model. Per-layer
bookkeeping that transformers uses (attention ``layer_idx`` for the KV cache, ``layer_types``) is
renumbered so the pruned model generates, saves and reloads like any other.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

from torch import nn

from kdlib.errors import ConfigError
from kdlib.models.head import decoder_of

log = logging.getLogger(__name__)


def evenly_spaced_layers(n_total: int, n_keep: int) -> list[int]:
    """``n_keep`` layer indices spread over ``range(n_total)``, always keeping the first and last."""
    if not 1 <= n_keep <= n_total:
        raise ConfigError(f"student.num_layers must be between 1 and {n_total}, got {n_keep}")
    if n_keep == 1:
        return [n_total - 1]
    return sorted({round(i * (n_total - 1) / (n_keep - 1)) for i in range(n_keep)})


def prune_decoder_layers(model: nn.Module, keep: Sequence[int]) -> nn.Module:
    """Keep only decoder layers ``keep`` (in that order) of a transformers causal LM, in place."""
    decoder = decoder_of(model)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__}: depth pruning needs a decoder with a `layers` list")
    n_total = len(layers)
    keep = list(keep)
    if not keep or len(set(keep)) != len(keep) or not all(0 <= i < n_total for i in keep):
        raise ConfigError(
            f"student.keep_layers must be distinct indices in [0, {n_total - 1}], got {keep}"
        )
    decoder.layers = nn.ModuleList([layers[i] for i in keep])
    for new_index, layer in enumerate(decoder.layers):
        for module in layer.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for config in {id(model.config): model.config, id(decoder.config): decoder.config}.values():
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        layer_types = getattr(text_config, "layer_types", None)
        if layer_types is not None and len(layer_types) == n_total:
            text_config.layer_types = [layer_types[i] for i in keep]
        text_config.num_hidden_layers = len(keep)
    return model


def prune_as_configured(model: nn.Module, keep_layers: Optional[Sequence[int]], num_layers: Optional[int]) -> Optional[list[int]]:
    """Prune ``model`` as a student config asks (``keep_layers``, else ``num_layers`` evenly
    spaced); the kept indices, or None when the config keeps every layer."""
    keep = list(keep_layers) if keep_layers is not None else None
    n_before = model.config.get_text_config().num_hidden_layers
    if keep is None and num_layers is not None:
        keep = evenly_spaced_layers(n_before, num_layers)
    if keep is None:
        return None
    prune_decoder_layers(model, keep)
    log.debug("kept decoder layers %s of %d", keep, n_before)  # the config resolution logs it once
    return keep
