"""The contract of a mode: one class per ``Mode`` value that says what it needs, and runs.

``check`` (pure) and ``resolve`` (the mode's own defaults, recorded with their reason) run when the
config is composed, before anything loads; ``needs`` tells :meth:`kdlib.pipeline.Pipeline.build`
which parts to build; the mode is then constructed from the built pipeline and ``run`` drives it
and returns a :class:`~kdlib.result.RunResult`. Nothing else branches on the mode.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Any, Optional

from kdlib.config.schema import KDConfig
from kdlib.result import RunResult

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline


class TeacherNeed(str, Enum):
    """When the mode needs teacher workers."""

    none = "none"  # no teacher at all (SFT, generate)
    uncached = "uncached"  # only for samples a teacher cache does not hold (off-policy, cache fill)
    always = "always"  # every step makes new teacher work (on-policy)


@dataclass(frozen=True)
class Needs:
    """What :meth:`kdlib.pipeline.Pipeline.build` builds for a mode."""

    # Tokenised data: data.train's responses and/or prompts (data.eval comes with either).
    responses: bool = True
    prompts: bool = False
    teacher: TeacherNeed = TeacherNeed.uncached
    students: bool = True
    # Generation engines running the student (on-policy: they take its weights) or the teacher.
    rollout: Optional[str] = None


class RunMode(ABC):
    def __init__(self, pipeline: "Pipeline") -> None:
        self.pipeline = pipeline
        self.cfg = pipeline.cfg

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        """Mode-specific configuration checks (raise ConfigError); pure."""

    @classmethod
    def resolve(cls, cfg: KDConfig, record: Any) -> None:
        """Settle the mode's own defaults in ``cfg`` (``record(key, value, reason)``); none by default."""

    @classmethod
    @abstractmethod
    def needs(cls, cfg: KDConfig) -> Needs:
        """What the pipeline must build for this mode."""

    @abstractmethod
    def run(self) -> RunResult:
        """Run to the end and report."""
