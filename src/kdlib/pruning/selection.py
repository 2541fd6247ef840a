"""From scores and targets to a :class:`PrunePlan`: which layers, heads, channels to keep.

Depth: the kept layers follow ``PruneConfig.depth`` (evenly spaced, the deepest span before the
last layer dropped, highest block influence, the span of lowest angular distance dropped, lowest
drop-one KL dropped, or the greedy KL order). Width is uniform across layers (a Hugging Face config
has one size per kind) but each layer keeps its own best units:

- attention: ``g`` KV groups of the highest group score, and within each kept group the same
  number ``a / g`` of its best query heads, so every kept query head still reads its own KV head
  (grouped-query attention stays consistent; head_dim never changes);
- MLP: each layer's highest-scoring channels;
- hidden: one set of channels for the whole residual stream (embeddings, every layer, final norm,
  head), scored over the kept layers only.

Sizes given or solved for a parameter budget (:mod:`kdlib.pruning.budget`) are checked here, so an
impossible request is a one-line :class:`~kdlib.errors.ConfigError` before any weight is copied.
"""

from __future__ import annotations

from typing import Sequence

import torch

from kdlib.errors import ConfigError
from kdlib.models.pruning import evenly_spaced_layers
from kdlib.pruning.config import DepthMethod, PruneConfig, PrunePlan, Sizes
from kdlib.pruning.importance import Scores


def select_layers(scores: Scores, n_total: int, n_keep: int, method: DepthMethod) -> list[int]:
    """The ``n_keep`` layers of ``range(n_total)`` that ``method`` keeps, in order."""
    if not 1 <= n_keep <= n_total:
        raise ConfigError(f"prune.num_layers must be between 1 and {n_total}, got {n_keep}")
    n_drop = n_total - n_keep
    if n_drop == 0:
        return list(range(n_total))
    method = DepthMethod(method)
    if method == DepthMethod.evenly:
        return evenly_spaced_layers(n_total, n_keep)
    if method == DepthMethod.last_span:
        return list(range(n_keep - 1)) + [n_total - 1]
    if method == DepthMethod.block_influence:
        return _top(scores.block_influence, n_keep)
    if method == DepthMethod.angular:
        distances = scores.angular.get(n_drop)
        if distances is None:
            raise ConfigError(f"prune.angular_spans must include {n_drop} (the number of layers dropped)")
        start = min(range(len(distances)), key=lambda l: distances[l])
        return [i for i in range(n_total) if not start <= i < start + n_drop]
    if method == DepthMethod.layer_kl:
        return _top(_required(scores.layer_kl, "layer_kl"), n_keep)
    dropped = _required(scores.greedy_dropped, "greedy_kl")
    if len(dropped) < n_drop:
        raise ConfigError(f"the greedy KL search dropped {len(dropped)} layers, {n_drop} are needed")
    return [i for i in range(n_total) if i not in dropped[:n_drop]]


def make_plan(scores: Scores, source: Sizes, target: Sizes, cfg: PruneConfig) -> PrunePlan:
    """Kept indices of every kind for ``target`` sizes (checked against ``source``)."""
    check_target(source, target)
    if cfg.keep_layers is not None:
        layers = list(cfg.keep_layers)
        if len(set(layers)) != len(layers) or not all(0 <= i < source.num_layers for i in layers):
            raise ConfigError(f"prune.keep_layers must be distinct indices in [0, {source.num_layers - 1}], got {layers}")
    else:
        layers = select_layers(scores, source.num_layers, target.num_layers, cfg.depth)
    per_group = target.num_attention_heads // target.num_key_value_heads
    group_size = source.num_attention_heads // source.num_key_value_heads
    heads, kv_heads, channels = [], [], []
    for layer in layers:
        groups = _top(scores.kv_heads[layer], target.num_key_value_heads)
        kept = []
        for group in groups:
            members = scores.heads[layer][group * group_size:(group + 1) * group_size]
            kept += [group * group_size + i for i in _top(members, per_group)]
        heads.append(kept)
        kv_heads.append(groups)
        channels.append(_top(scores.channels[layer], target.intermediate_size))
    hidden = _top(scores.hidden(layers).tolist(), target.hidden_size)
    return PrunePlan(layers=layers, heads=heads, kv_heads=kv_heads, channels=channels, hidden=hidden)


def check_target(source: Sizes, target: Sizes) -> None:
    """One-line errors for sizes a pruned model of ``source`` cannot have."""
    for name in ("num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size", "hidden_size"):
        value, limit = getattr(target, name), getattr(source, name)
        if not 1 <= value <= limit:
            raise ConfigError(f"prune.{name} must be between 1 and {limit} (the source's), got {value}")
    if target.num_attention_heads % target.num_key_value_heads:
        raise ConfigError(
            f"prune.num_attention_heads ({target.num_attention_heads}) must be a multiple of "
            f"prune.num_key_value_heads ({target.num_key_value_heads}): each KV group keeps as many query heads"
        )
    group_size = source.num_attention_heads // source.num_key_value_heads
    if target.num_attention_heads // target.num_key_value_heads > group_size:
        raise ConfigError(
            f"{target.num_attention_heads} query heads over {target.num_key_value_heads} KV heads is more than the "
            f"source's {group_size} per KV head; keep more KV heads"
        )


def _top(values: Sequence[float], k: int) -> list[int]:
    """Indices of the ``k`` largest ``values``, sorted (ties: the lower index)."""
    order = torch.argsort(torch.tensor(values, dtype=torch.float64), descending=True, stable=True)
    return sorted(order[:k].tolist())


def _required(values, name: str):
    if values is None:
        raise ConfigError(f"prune.depth={name} needs the {name} scores, which were not computed")
    return values
