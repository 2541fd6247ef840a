"""kdlib: knowledge distillation for large language models.

The teacher runs forward passes only and sends its last-layer hidden states; the student recomputes
the teacher's logits with the teacher's ``lm_head`` and trains on a fused, chunked KD loss. Typed
dataclass configs are composed by Hydra.

    import kdlib
    cfg = kdlib.compose(["loss=jsd", "loss.beta=0.3"])
    result = kdlib.run(cfg)

``import kdlib`` is light: torch, transformers, Ray and GPU inference engines load only when something
needs them.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "compose": "kdlib.config.compose",
    "run": "kdlib.runner",
    "RunResult": "kdlib.result",
    "KDConfig": "kdlib.config.schema",
    "register_loss": "kdlib.losses",
    "register_algorithm": "kdlib.algorithms",
    "Algorithm": "kdlib.algorithms",
    "register_reward": "kdlib.rewards",
    "Reward": "kdlib.rewards",
    "ConfigError": "kdlib.errors",
    "DataError": "kdlib.errors",
    "KdlibError": "kdlib.errors",
}

# Subpackages reachable as attributes without an explicit import (``kdlib.losses.get("kl")``).
_SUBMODULES = {"losses"}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:
        return import_module(f"kdlib.{name}")
    if name in _EXPORTS:
        value = getattr(import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'kdlib' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS) | _SUBMODULES)
