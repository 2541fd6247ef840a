"""The typed boundary of pruning: what to prune to (:class:`PruneConfig`) and what was kept
(:class:`PruneResult`).

A run prunes its student once, before any worker starts, from a :class:`PruneConfig`; the lead's
config schema nests one as ``student.prune`` and workers load the saved checkpoint. Keeping the
dataclasses here, free of any model code, lets the config layer import them without torch work.
Every target is optional: ``None`` keeps the source's size, so an empty config prunes nothing and
gives the source model back bit for bit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Optional


class DepthMethod(str, Enum):
    """How the decoder layers to keep are chosen (when ``num_layers`` is below the source's)."""

    # Spread evenly over the stack, first and last kept (kdlib's original default).
    evenly = "evenly"
    # Drop the deepest contiguous span before the last layer (keep the first k-1 and the last).
    last_span = "last_span"
    # Keep the layers with the highest block influence, 1 - cos(input, output) (ShortGPT).
    block_influence = "block_influence"
    # Drop the contiguous span whose input and output are closest in angle (Gromov et al.).
    angular = "angular"
    # Drop the layers whose removal alone changes the source's next-token distribution least (KL).
    layer_kl = "layer_kl"
    # Drop layers one at a time, each time the one whose removal from the current model costs the
    # least KL to the source's distribution.
    greedy_kl = "greedy_kl"


class WidthFit(str, Enum):
    """The width dimension solved to meet ``PruneConfig.params`` (the others stay as given)."""

    intermediate_size = "intermediate_size"
    hidden_size = "hidden_size"
    num_layers = "num_layers"


@dataclass
class PruneConfig:
    """A student pruned from its source model by importance on calibration tokens."""

    # Decoder layers to keep (None = all; with `params` and fit=num_layers, solved).
    num_layers: Optional[int] = None
    # How the kept layers are chosen: evenly, last_span, block_influence, angular, layer_kl, greedy_kl.
    depth: DepthMethod = DepthMethod.block_influence
    # Exactly these layer indices (overrides num_layers and depth).
    keep_layers: Optional[list[int]] = None
    # Query heads per layer to keep (None = all); a multiple of the kept KV heads.
    num_attention_heads: Optional[int] = None
    # KV heads (grouped-query groups) to keep, whole groups with their query heads (None = all).
    num_key_value_heads: Optional[int] = None
    # MLP channels per layer to keep (None = all; with `params` and fit=intermediate_size, solved).
    intermediate_size: Optional[int] = None
    # Hidden (embedding) channels to keep (None = all; with `params` and fit=hidden_size, solved).
    hidden_size: Optional[int] = None
    # Parameter budget of the pruned model (tied weights counted once); None = no budget.
    params: Optional[int] = None
    # The dimension solved for `params` when it is set: intermediate_size, hidden_size or num_layers.
    fit: WidthFit = WidthFit.intermediate_size
    # Solved or given widths are rounded down to a multiple of this (kernels like round sizes).
    round_to: int = 32
    # Calibration tokens for the activation and layer scores (taken from whole samples).
    calibration_tokens: int = 2048
    # Calibration tokens for the KL scores (layer_kl, greedy_kl), a prefix of the above.
    kl_tokens: int = 512
    # Seed that picks the calibration samples.
    seed: int = 0
    # Span lengths for which the angular-distance table is computed and plotted (None = 1..L-1).
    angular_spans: Optional[list[int]] = None
    # Compute the drop-one-layer KL scores even when the depth method does not need them.
    layer_kl_scores: bool = True

    def __post_init__(self) -> None:
        self.depth, self.fit = DepthMethod(self.depth), WidthFit(self.fit)

    def as_dict(self) -> dict:
        out = asdict(self)
        out["depth"], out["fit"] = self.depth.value, self.fit.value
        return out


@dataclass
class Sizes:
    """The sizes of a decoder-only language model that pruning changes."""

    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    hidden_size: int


@dataclass
class PrunePlan:
    """What to keep, index by index, decided from the scores before any weight is touched."""

    # Kept decoder layers of the source, in order.
    layers: list[int]
    # Per kept layer (same order): kept query heads, sorted, of the source layer.
    heads: list[list[int]]
    # Per kept layer: kept KV heads, sorted.
    kv_heads: list[list[int]]
    # Per kept layer: kept MLP channels, sorted.
    channels: list[list[int]]
    # Kept hidden channels, sorted (one set for the whole model: the residual stream).
    hidden: list[int]


@dataclass
class PruneResult:
    """What :func:`kdlib.pruning.prune_to_directory` built and where it is."""

    # Directory holding the pruned Hugging Face checkpoint (and tokenizer), scores.json and plots.
    directory: str
    sizes_before: Sizes
    sizes_after: Sizes
    params_before: int
    params_after: int
    # Kept indices of the source, per kind (see PrunePlan).
    plan: PrunePlan
    # Seconds spent on the scores (calibration forward, layer KL, greedy search), by part.
    seconds: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        return asdict(self)
