"""What each worker is built from: one typed spec per role, instead of positional tuples.

A launcher creates ``worker_cls(spec)`` for every spec of a group, in this process or inside a Ray
actor; specs are plain dataclasses of configs, so they pickle by reference to the config classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kdlib.cache.fingerprint import CacheNamespace
from kdlib.config.schema import KDConfig, ModelConfig, RolloutConfig, TeacherConfig, TransportConfig


@dataclass
class TeacherSpec:
    """One teacher replica."""

    teacher: TeacherConfig
    transport: TransportConfig
    device: str
    rank: int = 0
    # Self-distillation: build the teacher with this (the student's) architecture.
    architecture: Optional[ModelConfig] = None
    # With teacher.cache: the namespace the controller checked; the worker writes what it scores.
    cache: Optional[CacheNamespace] = None


@dataclass
class StudentSpec:
    """One data-parallel student replica."""

    cfg: KDConfig
    rank: int = 0
    world_size: int = 1


@dataclass
class RolloutSpec:
    """One generation engine: the model it runs and how it samples."""

    model: ModelConfig
    rollout: RolloutConfig
    device: str
    rank: int = 0
    # Needed when the engine receives weights (on-policy sync); None for mode=generate.
    transport: Optional[TransportConfig] = None
