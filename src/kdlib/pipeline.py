"""The pipeline: what one run is built of, built once, in dependency order, from a frozen config.

The design card's pipeline object "wires the teacher workers, the student workers and the loss
registry": its typed attributes below list everything a run holds, in the spirit of torchtitan's
Trainer header. :meth:`Pipeline.build` is the only place that builds them, from the mode's
:class:`~kdlib.controller.mode.Needs`: tokenizers and data first (a bad file or row is reported
before any model loads), the student pruned by importance when ``student.prune`` asks (once per
source, data and settings), the teacher cache (a run it covers fully loads no teacher), the launcher,
the teacher, rollout and student worker groups, and the head handshake. The mode is then made from
the built pipeline and runs; the pipeline does not know the mode and nothing fills it later. The
launcher is shut down when the pipeline closes, also after a failure while building.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdlib.config.node import is_frozen
from kdlib.config.schema import KDConfig
from kdlib.config.teachers import DEFAULT_TEACHER, several_teachers
from kdlib.controller import assembly
from kdlib.controller.mode import Needs, TeacherNeed
from kdlib.controller.teachers import Teachers, routed_data
from kdlib.data.bundle import DataBundle
from kdlib.launch import Launcher, build_launcher
from kdlib.tracking.trackers import Trackers
from kdlib.workers.groups import RolloutGroup, StudentGroup, TeacherGroup

if TYPE_CHECKING:
    from kdlib.cache.store import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class Pipeline:
    """A run's parts. Optional parts are absent when the mode does not need them."""

    # The resolved, frozen config (what config.yaml holds) and where the run writes.
    cfg: KDConfig
    run_dir: Path
    trackers: Trackers
    launcher: Launcher
    # Tokenised samples and prompts with their encoders (None: mode=generate reads rows itself).
    data: Optional[DataBundle]
    # Optimizer steps of the run (0 when nothing trains).
    total_steps: int
    # The offline teacher cache (teacher.cache), checked against this run's teacher.
    cache: Optional["TeacherCache"]
    teacher: Optional[TeacherGroup]
    rollout: Optional[RolloutGroup]
    students: Optional[StudentGroup]
    # Several teachers (teachers / routing): each named teacher's cache, group and head; `teacher`
    # is then the run's own teacher's group, if it is loaded.
    teachers: Optional[Teachers] = None

    @classmethod
    def build(cls, cfg: KDConfig, run_dir: Path, trackers: Trackers, needs: Needs) -> "Pipeline":
        if not is_frozen(cfg):
            raise ValueError("Pipeline.build takes a resolved, frozen config (kdlib.run freezes it)")
        with contextlib.ExitStack() as on_failure:
            data = cache = teachers = None
            steps = 0
            want_teacher = needs.teacher is not TeacherNeed.none
            routed = want_teacher and several_teachers(cfg)
            if routed and (needs.responses or needs.prompts):
                data = routed_data(cfg, prompts=needs.prompts, responses=needs.responses)
                steps = _total_steps(cfg, data, needs)
            elif needs.responses or needs.prompts:
                student_enc, teacher_enc = assembly.chat_encoders(cfg, with_teacher=want_teacher)
                data = assembly.load_data(cfg, student_enc, teacher_enc, prompts=needs.prompts, responses=needs.responses)
                steps = _total_steps(cfg, data, needs)
                if want_teacher and cfg.teacher.cache:
                    cache = assembly.open_teacher_cache(cfg, teacher_enc or student_enc)
                    want_teacher = _teacher_for_cache(cfg, cache, data, needs)
            if cfg.student.prune.output is not None:
                from kdlib.models.pruned import ensure_pruned

                ensure_pruned(cfg, run_dir, progress=cfg.logging.progress)
            launcher = build_launcher(cfg.launcher)
            on_failure.callback(launcher.shutdown)
            if routed:
                teachers = Teachers.build(cfg, launcher, data, needs)
                teacher = teachers.groups.get(DEFAULT_TEACHER)
            else:
                teacher = assembly.start_teacher(cfg, launcher, cache) if want_teacher else None
            rollout = None
            if needs.rollout is not None:
                model = cfg.student if needs.rollout == "student" else cfg.teacher
                rollout = assembly.start_rollout(cfg, launcher, model, syncs_weights=needs.rollout == "student")
            students = None
            if needs.students and routed:
                students = assembly.start_students(cfg, launcher, data, steps, None, teachers=teachers.sides)
            elif needs.students:
                head = assembly.teacher_head(cfg, teacher, cache) if needs.teacher is not TeacherNeed.none else None
                students = assembly.start_students(cfg, launcher, data, steps, head)
            on_failure.pop_all()
        return cls(cfg=cfg, run_dir=Path(run_dir), trackers=trackers, launcher=launcher, data=data,
                   total_steps=steps, cache=cache, teacher=teacher, rollout=rollout, students=students,
                   teachers=teachers)

    def close(self) -> None:
        self.launcher.shutdown()

    def __enter__(self) -> "Pipeline":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _total_steps(cfg: KDConfig, data: DataBundle, needs: Needs) -> int:
    if not needs.students:
        return 0
    if needs.prompts:  # on-policy: steps over prompts
        per_step = cfg.train.global_batch_size // cfg.rollout.n_samples_per_prompt
        return assembly.total_steps(cfg, len(data.prompts), per_step, "prompts")
    return assembly.total_steps(cfg, len(data.train), cfg.train.global_batch_size)


def _teacher_for_cache(cfg: KDConfig, cache: "TeacherCache", data: DataBundle, needs: Needs) -> bool:
    """Whether teacher workers are needed besides the cache; logs what the cache covers."""
    if needs.teacher is TeacherNeed.always:
        return True  # e.g. on-policy: rollouts are new; the cache serves evaluation and dataset steps
    missing = assembly.uncached_samples(cache, data)
    n_samples = len(data.train) + len(data.eval)
    if missing:
        log.info("teacher cache %s: %d of %d samples missing; the teacher computes and stores them",
                 cfg.teacher.cache, missing, n_samples)
    else:
        log.info("teacher cache %s covers all %d samples: no teacher model is loaded", cfg.teacher.cache, n_samples)
    return missing > 0
