"""The contract of a mode: one class per ``Mode`` value that builds what it needs and runs.

``check`` runs at composition (before anything loads) and may settle mode-specific defaults;
``build`` fills a :class:`~kdlib.pipeline.Pipeline` (data, launcher, worker groups) and returns
the mode object; ``run`` drives the workers and returns a :class:`~kdlib.result.RunResult`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from kdlib.config.schema import KDConfig
from kdlib.result import RunResult

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline


class RunMode(ABC):
    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        self.cfg = pipeline.cfg

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        """Mode-specific configuration checks (raise ConfigError); may fill mode defaults."""

    @classmethod
    @abstractmethod
    def build(cls, pipeline: "Pipeline") -> "RunMode":
        """Build what this mode needs into ``pipeline``; return the mode object."""

    @abstractmethod
    def run(self) -> RunResult:
        """Run to the end and report."""
