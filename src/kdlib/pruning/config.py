"""The typed boundary of pruning: what to prune to (:class:`PruneConfig`) and what was kept
(:class:`PruneResult`).

A run prunes its student once, before any worker starts, from the :class:`PruneConfig` at
``student.prune``; the pruned checkpoint is kept in kdlib's cache (``output``, settled when the run's
config is resolved) and every worker loads it. Keeping the dataclasses here, free of any model code,
lets the config layer import them without torch work. Every target is optional: ``None`` keeps the
source's size, so an empty config prunes nothing.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Optional

from kdlib.config.node import ConfigNode


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
class PruneConfig(ConfigNode):
    """A student pruned from its source model by importance on calibration tokens (off while every
    target is null)."""

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
    layer_kl_scores: bool = False
    # Filled when the run's config is resolved, not set by users: the directory of the pruned
    # checkpoint in kdlib's cache (made once per source, data and settings; later runs reuse it).
    output: Optional[str] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "depth", DepthMethod(self.depth))
        object.__setattr__(self, "fit", WidthFit(self.fit))

    @property
    def active(self) -> bool:
        """Whether any target asks for pruning."""
        targets = (self.num_layers, self.keep_layers, self.num_attention_heads, self.num_key_value_heads,
                   self.intermediate_size, self.hidden_size, self.params)
        return any(t is not None for t in targets)

    def check(self) -> None:
        for name in ("num_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                     "hidden_size", "params"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be positive or null, got {value}")
        for name in ("round_to", "calibration_tokens", "kl_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.kl_tokens > self.calibration_tokens:
            raise ValueError(f"kl_tokens ({self.kl_tokens}) must not exceed calibration_tokens ({self.calibration_tokens})")

    def as_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "output"}
        out["depth"], out["fit"] = self.depth.value, self.fit.value
        out["keep_layers"] = None if self.keep_layers is None else list(self.keep_layers)
        out["angular_spans"] = None if self.angular_spans is None else list(self.angular_spans)
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
