"""What each worker is built from: one typed spec per role, holding only what that worker needs.

A launcher creates ``worker_cls(spec)`` for every spec of a group, in this process or inside a Ray
actor; specs are plain dataclasses of (frozen) config nodes, built by keyword in
:mod:`kdlib.pipeline`, so they pickle by reference to the config classes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kdlib.cache.fingerprint import CacheNamespace
from kdlib.config.models import ModelConfig, StudentConfig, TeacherConfig
from kdlib.config.rollout import RolloutConfig
from kdlib.config.training import AlgorithmConfig, LossConfig, TrainConfig, TransportConfig


@dataclass(frozen=True)
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
    # Rows per chunk when the worker computes a top-k or sampled signal from hidden states (the
    # loss's chunk_size: the same logits, bit for bit, as the student's hidden-state path).
    chunk_size: int = 256


@dataclass(frozen=True)
class StudentSpec:
    """One data-parallel student replica."""

    student: StudentConfig
    algorithm: AlgorithmConfig
    loss: LossConfig
    train: TrainConfig
    transport: TransportConfig
    device: str
    seed: int
    # Modules to import first (a user's algorithm or loss registers there; in a Ray actor too).
    plugins: tuple[str, ...] = ()
    # teacher.cache: the directory the controller checked (micro-batches may come from it).
    teacher_cache: Optional[str] = None
    rank: int = 0
    world_size: int = 1
    # On-policy: the temperature rollouts are sampled at (greedy: 1); the trainer's log-probabilities
    # of the sampled tokens are taken at it, to measure how far the rollout engine's are.
    rollout_temperature: float = 1.0


@dataclass(frozen=True)
class RolloutSpec:
    """One generation engine: the model it runs and how it samples."""

    model: ModelConfig
    rollout: RolloutConfig
    device: str
    rank: int = 0
    # Needed when the engine receives weights (on-policy sync); None for mode=generate.
    transport: Optional[TransportConfig] = None
    # Report each sampled token's log-probability (on-policy rollouts: the rollout-train agreement
    # and importance weights read them; mode=generate does not need them).
    logprobs: bool = False
