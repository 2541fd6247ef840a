"""Parameter counts and targets: the sizes a :class:`PruneConfig` asks for, with one dimension
solved to meet a parameter budget.

Counts come from the model class itself, built from a config on the ``meta`` device (no memory, no
weights), so tied embeddings, biases, Qwen3's q/k norms and Gemma's extra norms are counted exactly
as the pruned checkpoint will hold them (tied weights once). The count of a decoder-only model is
affine in each prunable size taken alone (number of layers, MLP width, hidden width with head_dim
fixed), so two counts give the line and the budget's solution exactly; it is rounded down to a
multiple of ``round_to`` (layers: to a whole layer; hidden: also a multiple of the query heads,
which configs require), never above the budget.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from kdlib.errors import ConfigError
from kdlib.pruning.config import PruneConfig, Sizes, WidthFit
from kdlib.pruning.surgery import pruned_config


def count_parameters(model_class: type, config, sizes: Sizes) -> int:
    """Parameters of ``model_class`` built from ``config`` resized to ``sizes`` (tied ones once)."""
    resized = pruned_config(config, sizes, None)
    text = resized.get_text_config() if hasattr(resized, "get_text_config") else resized
    if getattr(text, "layer_types", None) is not None and len(text.layer_types) != sizes.num_layers:
        text.layer_types = (list(text.layer_types) * sizes.num_layers)[: sizes.num_layers]
    with torch.device("meta"):
        model: nn.Module = model_class._from_config(resized)
    return sum(p.numel() for p in model.parameters())


def target_sizes(model_class: type, config, source: Sizes, cfg: PruneConfig) -> Sizes:
    """The sizes ``cfg`` asks for: given ones, the source's elsewhere, ``cfg.fit`` solved for
    ``cfg.params`` when a budget is set."""
    n_layers = len(cfg.keep_layers) if cfg.keep_layers is not None else cfg.num_layers
    target = Sizes(
        num_layers=n_layers or source.num_layers,
        num_attention_heads=cfg.num_attention_heads or source.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads or source.num_key_value_heads,
        intermediate_size=cfg.intermediate_size or source.intermediate_size,
        hidden_size=cfg.hidden_size or source.hidden_size,
    )
    if cfg.num_attention_heads is not None and cfg.num_key_value_heads is None:
        # fewer query heads, same KV heads: as many fewer per group (checked in selection)
        target.num_key_value_heads = min(source.num_key_value_heads, target.num_attention_heads)
    if cfg.params is None:
        return target
    name = WidthFit(cfg.fit).value
    if cfg.keep_layers is not None and name == "num_layers":
        raise ConfigError("prune.keep_layers fixes the number of layers; fit another size to prune.params")
    limit = getattr(source, name)
    step = 1 if name == "num_layers" else cfg.round_to
    if name == "hidden_size":  # configs require a multiple of the number of query heads
        heads = target.num_attention_heads
        step = math.lcm(step, heads) if math.lcm(step, heads) <= limit // 4 else heads
    at_one = count_parameters(model_class, config, replace(target, **{name: step}))
    at_limit = count_parameters(model_class, config, replace(target, **{name: limit}))
    per_unit = (at_limit - at_one) / (limit - step) if limit > step else 0.0
    if cfg.params < at_one:
        raise ConfigError(
            f"prune.params={cfg.params:,} is below the smallest model with {name}={step} ({at_one:,} parameters)"
        )
    solved = limit if per_unit == 0 else step + int((cfg.params - at_one) // per_unit)
    solved = min(limit, max(step, solved // step * step))
    return replace(target, **{name: solved})
