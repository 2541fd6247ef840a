"""Pruning a model into a student: importance on calibration tokens, then depth and width pruning
to a target or a parameter budget, saved as an ordinary Hugging Face checkpoint.

Prune once, then distil: :func:`prune_to_directory` is what a run calls before its workers start
(docs/pruning.md). Modules: ``config`` (the typed boundary), ``calibration`` (tokens and the
recorded forward pass), ``importance`` and ``layer_kl`` (the scores), ``selection`` (what to
keep), ``budget`` (sizes for a parameter budget), ``surgery`` (the pruned model), ``report``
(scores.json and the plot), ``prune`` (the entry point). Importing the package is light (the
config layer reads ``PruneConfig``); the entry point imports torch when first used.
"""

from importlib import import_module
from typing import Any

from kdlib.pruning.config import DepthMethod, PruneConfig, PrunePlan, PruneResult, Sizes, WidthFit

_LAZY = {"load_source", "parameter_budget", "prune_model", "prune_to_directory"}  # need torch


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module("kdlib.pruning.prune"), name)
    raise AttributeError(f"module 'kdlib.pruning' has no attribute {name!r}")


__all__ = [
    "DepthMethod", "PruneConfig", "PrunePlan", "PruneResult", "Sizes", "WidthFit",
    "load_source", "parameter_budget", "prune_model", "prune_to_directory",
]
