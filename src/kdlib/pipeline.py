"""Pipeline.from_config: the one entry that turns a config into data, workers and a running mode.

A :class:`Pipeline` holds what a run has built: the launcher, the worker groups (teacher, student,
rollout: whichever the mode needs), the tokenised data and the step count. Building is the mode's
business: ``from_config`` looks the mode up in :data:`kdlib.controller.MODES` and lets its
``build`` fill the pipeline (each mode builds what it needs, nothing else branches on the mode);
``run`` runs that mode. The launcher is shut down when the pipeline closes, also after a failure
while building. The run's experiment trackers (started before, by ``kdlib.run``) ride along.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdlib.config.schema import KDConfig
from kdlib.data.bundle import DataBundle
from kdlib.launch import Launcher, WorkerGroup
from kdlib.result import RunResult
from kdlib.tracking.trackers import Trackers

if TYPE_CHECKING:
    from kdlib.cache.store import TeacherCache
    from kdlib.controller.mode import RunMode


@dataclass
class Pipeline:
    cfg: KDConfig
    run_dir: Optional[Path]
    launcher: Optional[Launcher] = None
    student_tokenizer: Any = None
    data: Optional[DataBundle] = None
    teacher: Optional[WorkerGroup] = None
    student: Optional[WorkerGroup] = None
    rollout: Optional[WorkerGroup] = None
    total_steps: int = 0
    # The offline teacher cache (teacher.cache), opened by modes that use it.
    cache: Optional["TeacherCache"] = None
    mode: Optional["RunMode"] = None
    # W&B / TensorBoard (none: nothing but the run directory's files).
    trackers: Trackers = field(default_factory=Trackers)

    @classmethod
    def from_config(cls, cfg: KDConfig, run_dir: Optional[Path], trackers: Optional[Trackers] = None) -> "Pipeline":
        from kdlib.controller import MODES

        pipeline = cls(cfg=cfg, run_dir=None if run_dir is None else Path(run_dir), trackers=trackers or Trackers())
        try:
            pipeline.mode = MODES.get(cfg.mode.value).build(pipeline)
        except BaseException:
            pipeline.close()
            raise
        return pipeline

    def run(self) -> RunResult:
        assert self.mode is not None, "Pipeline.from_config builds the mode"
        return self.mode.run()

    def close(self) -> None:
        if self.launcher is not None:
            self.launcher.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
