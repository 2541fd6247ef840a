"""Backends: the inference engines kdlib runs teachers and rollouts on, one package each.

Each subpackage (``hf``: transformers, the embedded default; others for GPU engines) registers its
teacher backend, rollout backend, weight-sync strategy and their typed options in the registries of
:mod:`kdlib.backends.base` when it is imported, lazily (``"module:Class"``), so registering costs no
heavy import. Importing this package imports every subpackage it holds; a plugin module can
register a backend of its own the same way. The core (controller, workers, config) only ever goes
through the registries.
"""

from __future__ import annotations

import pkgutil
from importlib import import_module

from kdlib.backends.base import (
    IMAGE_ROLLOUT_BACKENDS, ROLLOUT_BACKENDS, TEACHER_BACKENDS, WEIGHT_SYNCS, Generation, RolloutBackend,
    TeacherBackend, TeacherCapabilities, WeightSync,
)

for _info in pkgutil.iter_modules(__path__):
    if _info.ispkg:
        import_module(f"{__name__}.{_info.name}")

__all__ = [
    "IMAGE_ROLLOUT_BACKENDS", "ROLLOUT_BACKENDS", "TEACHER_BACKENDS", "WEIGHT_SYNCS", "Generation",
    "RolloutBackend", "TeacherBackend", "TeacherCapabilities", "WeightSync",
]
