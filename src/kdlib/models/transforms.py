"""Student transforms: the one place where the loaded student is changed before it trains.

Loading and depth pruning give a plain transformers model. Some runs change it before sharding:
LoRA wraps it with peft adapters (``models/lora.py``), freezing keeps embeddings or the first
layers fixed. Each such change is a registered :class:`StudentTransform` with its options at
``student.<name>``; ``student.transforms`` lists them in the order they run, and a transform whose
options leave it off does nothing. A transform also knows how to give the weights back in the
layout consumers expect (:meth:`StudentTransform.plain_state`): the rollout engine, a
self-distillation teacher and the saved ``student/`` all take the plain transformers model's names
and weights (adapters merged), whatever happened to the student. Plugins register their own with
:func:`register_student_transform` and add the name to ``student.transforms``.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kdlib.config.schema import StudentConfig
from kdlib.errors import ConfigError
from kdlib.models.head import decoder_of
from kdlib.registry import Registry

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


class StudentTransform(ABC):
    """One change to the student model, made after loading and pruning, before sharding."""

    def __init__(self, cfg: StudentConfig) -> None:
        self.cfg = cfg

    @classmethod
    def enabled(cls, cfg: StudentConfig) -> bool:
        """Whether ``cfg`` asks for this transform (listed transforms with no options always run)."""
        return True

    @classmethod
    def check(cls, cfg: StudentConfig) -> None:
        """Raise ValueError for options the types allow but the transform cannot use (run at
        composition, before any model loads)."""

    @abstractmethod
    def apply(self, model: nn.Module) -> nn.Module:
        """The transformed model: ``model`` changed in place, or a wrapper around it."""

    def plain_state(self, state: State) -> State:
        """``state`` (the full state dict of the transformed model) in the names and layout of the
        model before this transform. Default: unchanged."""
        return state

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model this transform was applied to, when :meth:`apply` wrapped it (its
        ``save_pretrained`` writes the plain layout). Default: ``model`` itself."""
        return model

    def save(self, model: nn.Module, state: State, student_dir: Path) -> dict[str, Path]:
        """Extra outputs beside ``student_dir`` (given the full transformed state); name -> path."""
        return {}


STUDENT_TRANSFORMS: Registry[type[StudentTransform]] = Registry("student transform")


def register_student_transform(name: str) -> Callable[[type[StudentTransform]], type[StudentTransform]]:
    """Class decorator registering a :class:`StudentTransform` under ``name``."""

    def decorate(cls: type[StudentTransform]) -> type[StudentTransform]:
        if not (isinstance(cls, type) and issubclass(cls, StudentTransform)):
            raise TypeError(f"student transform {name!r} must subclass kdlib.models.transforms.StudentTransform")
        STUDENT_TRANSFORMS.register(name, cls)
        return cls

    return decorate


@dataclass
class TransformedStudent:
    """The student model as it trains, and the transforms that made it so (in order)."""

    model: nn.Module
    transforms: list[StudentTransform] = field(default_factory=list)

    def plain_state(self, state: State) -> State:
        """A full state dict of :attr:`model` in the plain transformers layout (transforms undone
        last to first)."""
        for transform in reversed(self.transforms):
            state = transform.plain_state(state)
        return state

    def plain_model(self) -> nn.Module:
        """The transformers model under every wrapper (for ``save_pretrained`` of a plain state)."""
        model = self.model
        for transform in reversed(self.transforms):
            model = transform.unwrap(model)
        return model

    def save_extras(self, state: State, student_dir: Path) -> dict[str, Path]:
        """Every transform's extra outputs (e.g. ``student_adapter/``), given the full state."""
        outputs: dict[str, Path] = {}
        for transform in self.transforms:
            outputs.update(transform.save(self.model, state, student_dir))
        return outputs


def apply_transforms(model: nn.Module, cfg: StudentConfig) -> TransformedStudent:
    """Run the enabled transforms of ``cfg.transforms`` in order on ``model``."""
    student = TransformedStudent(model)
    for name in cfg.transforms:
        cls = STUDENT_TRANSFORMS.get(name)
        if not cls.enabled(cfg):
            continue
        transform = cls(cfg)
        student.model = transform.apply(student.model)
        student.transforms.append(transform)
    if student.transforms:
        total = sum(p.numel() for p in student.model.parameters())
        trainable = sum(p.numel() for p in student.model.parameters() if p.requires_grad)
        log.info("student transforms %s: %d of %d parameters train (%.2f%%)",
                 [type(t).__name__ for t in student.transforms], trainable, total, 100.0 * trainable / max(total, 1))
    return student


def check_transforms(cfg: StudentConfig) -> None:
    """Composition check: known names, no repeats, and each enabled transform's own check."""
    if len(set(cfg.transforms)) != len(cfg.transforms):
        raise ConfigError(f"student.transforms lists a transform twice: {list(cfg.transforms)}")
    for name in cfg.transforms:
        if name not in STUDENT_TRANSFORMS:
            raise ConfigError(
                f"student.transforms: unknown student transform {name!r}; choose from: {', '.join(STUDENT_TRANSFORMS.names())}"
            )
        cls = STUDENT_TRANSFORMS.get(name)
        try:
            cls.check(cfg)
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"student.{name}: {exc}") from None


class FreezeTransform(StudentTransform):
    """Keeps the input embeddings and/or the first decoder layers fixed (``student.freeze``)."""

    @classmethod
    def enabled(cls, cfg: StudentConfig) -> bool:
        return cfg.freeze.embeddings or cfg.freeze.first_layers > 0

    @classmethod
    def check(cls, cfg: StudentConfig) -> None:
        if cfg.freeze.first_layers < 0:
            raise ValueError(f"first_layers must be >= 0, got {cfg.freeze.first_layers}")
        if cls.enabled(cfg) and cfg.lora.r > 0:
            raise ValueError("has no effect with student.lora (LoRA already keeps every base weight fixed)")

    def apply(self, model: nn.Module) -> nn.Module:
        layers = decoder_of(model).layers
        n = self.cfg.freeze.first_layers
        if n > len(layers):
            raise ConfigError(f"student.freeze.first_layers={n}, but the student has {len(layers)} decoder layers")
        if self.cfg.freeze.embeddings:
            model.get_input_embeddings().requires_grad_(False)
            if model.get_output_embeddings() is not None and model.get_output_embeddings().weight is model.get_input_embeddings().weight:
                log.info("student.freeze.embeddings: the head is tied to the embeddings and stays fixed too")
        for layer in layers[:n]:
            layer.requires_grad_(False)
        return model


STUDENT_TRANSFORMS.register("freeze", FreezeTransform)
STUDENT_TRANSFORMS.register("lora", "kdlib.models.lora:LoraTransform")
