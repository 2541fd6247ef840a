"""The training loop shared by off-policy and on-policy distillation: one optimizer step at a time.

A subclass says where each global batch of samples comes from (:meth:`TrainingLoop.sample_batches`:
the dataset, or the student's own rollouts) and what happens after a step (:meth:`after_step`:
weight sync). Everything else is here, once. Per optimizer step (:meth:`prepare`, :meth:`train`):
plan the global batch across student workers and into micro-batches (``data.batching.plan_step``),
have the teacher score every micro-batch (hidden states at the loss positions, through the
transport; :mod:`kdlib.controller.dispatch`), then have every student worker accumulate gradients
over its micro-batches and step. The loss normaliser is the number of loss tokens in the whole
global batch, so the objective does not depend on the split.

With ``pipeline.prefetch=k`` the teacher scores up to k global batches ahead while the students
train; with ``pipeline.colocate`` the two phases take turns and free the devices for each other.
A self-distillation teacher (``teacher.from_student``) is refreshed from the student every
``teacher.update_freq`` steps or averaged with ``teacher.ema_decay`` after every step. Checkpoints,
resuming, SIGINT/SIGTERM and non-finite steps are :mod:`kdlib.controller.checkpointing`,
:mod:`~kdlib.controller.interrupt` and :mod:`~kdlib.controller.bad_steps`; the end of a run (held-out
table, plot, saved student) is :mod:`kdlib.controller.finish`.
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Optional

from kdlib.batch import MicroBatch
from kdlib.config.schema import KDConfig
from kdlib.controller import assembly
from kdlib.controller.bad_steps import BadSteps
from kdlib.controller.checkpointing import Checkpoints
from kdlib.controller.dispatch import TeacherDispatch, TeacherJob
from kdlib.controller.routed_dispatch import RoutedDispatch
from kdlib.controller.evaluator import Evaluator
from kdlib.controller.finish import finish_training
from kdlib.controller.interrupt import StopRequests
from kdlib.controller.mode import RunMode
from kdlib.controller.teacher_metrics import route_metrics
from kdlib.data.batching import StepPlan, global_batches
from kdlib.data.samples import Sample
from kdlib.errors import CheckpointError, ConfigError, Interrupted, KdlibError, TeacherUnavailable, TrainingError
from kdlib.progress import progress
from kdlib.result import RunResult
from kdlib.rollout_agreement import agreement_metrics
from kdlib.tracking import MetricsWriter, write_json
from kdlib.tracking.records import read_json
from kdlib.workers.student import StudentShare

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline

log = logging.getLogger(__name__)


@dataclass
class PreparedStep:
    """A global batch turned into micro-batches, with its teacher work started."""

    samples: int
    plan: StepPlan
    batches: list[MicroBatch]
    teacher: TeacherJob
    submitted_at: float

    @property
    def sample_ids(self) -> list[int]:
        return [i for batch in self.batches for i in batch.sample_ids]


class TrainingLoop(RunMode):
    """The optimizer-step loop of the training modes (off-policy, SFT, on-policy)."""

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        if cfg.student.model in (None, "???"):
            raise ConfigError("student.model is not set")

    def __init__(self, pipeline: "Pipeline") -> None:
        super().__init__(pipeline)
        self.run_dir = pipeline.run_dir
        self.trackers = pipeline.trackers
        self.data = pipeline.data
        self.total_steps = pipeline.total_steps
        self.students = pipeline.students
        self.teacher_workers = pipeline.teacher
        self.teacher = RoutedDispatch(pipeline.teachers) if pipeline.teachers is not None else TeacherDispatch(
            pipeline.teacher, pipeline.cache,
            start_teacher=lambda: assembly.start_teacher(self.cfg, pipeline.launcher, pipeline.cache),
        )
        self.evaluate = Evaluator(self.cfg, self.data, self.students, self.teacher)
        self.follows_student = pipeline.teacher is not None and self.cfg.teacher.follows_student
        self.checkpoints = Checkpoints(
            self.cfg, self.run_dir, self.students, self.teacher_workers if self.follows_student else None,
            self.total_steps, tokenizer=self.data.student_encoder.pretrained_files,
        )
        self.bad_steps = BadSteps(self.cfg.train.max_bad_steps, max_fraction=self.cfg.train.max_skipped_fraction,
                                  run_steps=self.total_steps)
        self.stop = StopRequests()
        self._last_step_end: Optional[float] = None  # wall clock per step includes preparing it
        self._saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote
        self._saved_at = time.monotonic()  # when it was written (or the run started)
        self._done_step = 0  # the last step whose update finished (applied or skipped)

    def run(self) -> RunResult:
        cfg = self.cfg
        result = RunResult(run_dir=self.run_dir)
        write_json(self.run_dir / "data_report.json", {k: r.as_dict() for k, r in self.data.reports.items()})
        with self.stop:
            first_step = self.resume() + 1
            self._done_step = first_step - 1
            evals = self._earlier_evaluations(result, first_step)
            if cfg.eval.before and first_step == 1:
                result.eval_before = self.evaluate()
                if result.eval_before:
                    log.info("eval before training: %s", _fmt(result.eval_before))
                    self.trackers.log_eval(result.eval_before, step=0)
            self._stop_if_requested(first_step - 1)
            writer = MetricsWriter(self.run_dir, self.trackers, resumed_at=first_step - 1)
            try:
                self.start(first_step)
                self._train_steps(first_step, writer, result, evals)
            except (TrainingError, TeacherUnavailable) as exc:  # the weights are those of the last good update: keep them
                raise type(exc)(f"{exc}; {self._last_resort_checkpoint()}") from None
            finally:
                writer.close()
            self._stop_if_requested(self.total_steps, saved=self._saved_step)
        result.eval_after = self.evaluate()
        self.trackers.log_eval(result.eval_after, self.total_steps)
        finish_training(self.cfg, self.run_dir, self.trackers, self.checkpoints, self.total_steps, result, writer.rows,
                        evals, skipped=self.bad_steps, saved_step=self._saved_step)
        return result

    def _earlier_evaluations(self, result: RunResult, first_step: int) -> list[dict]:
        """A resumed run keeps the held-out results of the steps before its checkpoint."""
        if first_step == 1:
            return []
        earlier = read_json(self.run_dir / "eval.json") or {}
        result.eval_before = earlier.get("before")
        return [e for e in earlier.get("during") or [] if e.get("step", first_step) < first_step]

    def _last_resort_checkpoint(self) -> str:
        """Checkpoint the last finished step (when not saved yet) before the run stops; says where."""
        step = self._done_step
        if step < 1:
            return "nothing was trained, nothing to resume"
        try:
            directory = self.checkpoints.latest() if self._saved_step == step else self.save_checkpoint(step)
        except CheckpointError as exc:
            return f"no checkpoint could be written: {exc}"
        return f"checkpoint {directory} (continue with train.resume={self.run_dir})"

    def _train_steps(self, first_step: int, writer: MetricsWriter, result: RunResult, evals: list[dict]) -> None:
        """Steps ``first_step`` .. ``total_steps``; stops early (with a checkpoint) when asked to."""
        cfg, total = self.cfg, self.total_steps
        batches = self.sample_batches(skip=first_step - 1)
        self._last_step_end = time.perf_counter()
        pending: deque[PreparedStep] = deque()
        with progress("distilling", total=total, unit="step", initial=first_step - 1,
                      enabled=cfg.logging.progress) as bar:
            for step in range(first_step, total + 1):
                while len(pending) < cfg.pipeline.prefetch + 1:
                    samples = next(batches, None)
                    if samples is None:
                        break
                    pending.append(self.prepare(samples))
                prepared = pending.popleft()
                metrics = self.train(prepared)
                metrics.update(self.after_step(step))
                metrics["step"] = step
                self._done_step = step
                try:  # counts the step and adds skipped_steps; raises when too many were skipped
                    self.bad_steps.record(step, metrics, prepared.sample_ids, metrics.pop("bad_sample_ids"))
                finally:
                    if step % cfg.logging.log_every == 0 or step == total or metrics.get("skipped"):
                        writer.write(metrics)
                        result.metrics = metrics
                bar.set_postfix(**self.progress_fields(metrics))
                bar.update(1)
                if self._checkpoint_due(step):
                    self.save_checkpoint(step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < total:
                    during = self.evaluate()
                    self.trackers.log_eval(during, step)
                    evals.append({"step": step, **(during or {})})
                if step < total:
                    self._stop_if_requested(step, saved=self._saved_step)

    def _checkpoint_due(self, step: int) -> bool:
        """Every ``train.checkpoint_every`` steps, and when ``train.checkpoint_minutes`` have passed
        since the last checkpoint (not at the last step: the student is saved then)."""
        train = self.cfg.train
        if train.checkpoint_every and step % train.checkpoint_every == 0:
            return True
        minutes = train.checkpoint_minutes
        return bool(minutes) and step < self.total_steps and time.monotonic() - self._saved_at >= 60 * minutes

    def progress_fields(self, metrics: dict[str, Any]) -> dict[str, float]:
        """What the progress bar shows after a step."""
        return {"loss": metrics["loss"], "kd": metrics["kd_loss"]}

    def _stop_if_requested(self, step: int, saved: Optional[int] = None) -> None:
        """After a SIGINT/SIGTERM: write a checkpoint of ``step`` (unless ``saved`` is it) and stop."""
        if not self.stop.requested:
            return
        name = self.stop.signal_name
        if step < 1:
            raise Interrupted(f"interrupted by {name} before the first training step; nothing to resume",
                              signal_number=self.stop.signal_number, resume_dir=None)
        directory = self.checkpoints.latest() if saved == step else self.save_checkpoint(step)
        raise Interrupted(f"interrupted by {name} after step {step}/{self.total_steps}; checkpoint {directory}",
                          signal_number=self.stop.signal_number, resume_dir=str(self.run_dir))

    @abstractmethod
    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        """The global batches of samples to train on, after the first ``skip`` (resumed) steps."""

    def dataset_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        """Global batches of data.train's samples (a seeded order per epoch, epochs repeating for
        as long as the run asks), after the first ``skip``."""
        cfg = self.cfg
        stream = global_batches(self.data.train, batch_size=cfg.train.global_batch_size, shuffle=cfg.data.shuffle,
                                seed=cfg.seed)
        for _ in range(skip):
            next(stream)
        return stream

    def start(self, first_step: int) -> None:
        """Before the first step of this process (after :meth:`resume`); subclasses add to it."""

    def after_step(self, step: int) -> dict[str, float]:
        """After each optimizer step: update a self-distillation teacher; extra metrics."""
        teacher = self.cfg.teacher
        if self.teacher_workers is not None and teacher.ema_decay is not None:
            return {"teacher_update_seconds": self.update_teacher(ema_decay=teacher.ema_decay)}
        if self.teacher_workers is not None and teacher.update_freq and step % teacher.update_freq == 0:
            return {"teacher_update_seconds": self.update_teacher(ema_decay=None)}
        return {}

    def update_teacher(self, *, ema_decay: Optional[float]) -> float:
        """Copy (or average in) the student's weights into the teacher; seconds spent."""
        start = time.perf_counter()
        handles = self.students.export_weights(self.cfg.onpolicy.sync_bucket_mb * 2**20)
        self.teacher_workers.load_weights(handles, ema_decay)
        self.students.set_teacher_head(self.teacher_workers.lm_head())
        self.evaluate.invalidate()  # the cached eval teacher outputs are stale now
        return time.perf_counter() - start

    def prepare(self, samples: list[Sample]) -> PreparedStep:
        """Plan a global batch, collate its micro-batches and start the teacher on them."""
        plan, batches = self.data.step_batches(samples, self.cfg.train, self.students.size)
        if self.cfg.pipeline.colocate:
            self.teacher.wake()
        job = self.teacher.submit(batches)
        return PreparedStep(len(samples), plan, batches, job, time.perf_counter())

    def step(self, samples: list[Sample], step: int = 1) -> dict[str, float]:
        """One optimizer step on a global batch (no prefetch), then :meth:`after_step`; metrics."""
        self._last_step_end = time.perf_counter()
        metrics = self.train(self.prepare(samples))
        metrics.update(self.after_step(step))
        return metrics

    def train(self, prepared: PreparedStep) -> dict[str, Any]:
        """Collect the teacher outputs of a prepared step and run the students' optimizer step."""
        colocate = self.cfg.pipeline.colocate
        start = time.perf_counter()
        teacher = self.teacher.collect(prepared.teacher)
        waited = time.perf_counter() - start
        if colocate:
            self.teacher.sleep()
            self.students.wake()
        plan, batches = prepared.plan, prepared.batches
        normaliser = float(sum(b.n_loss_tokens for b in batches))
        handles = teacher.handles
        for attempt in range(2):  # a cached output the students cannot read is computed again, once
            shares = [
                StudentShare([batches[i] for i, _ in entries], [handles[i] for i, _ in entries], [w for _, w in entries])
                for entries in plan.per_worker
            ]
            results = self.students.train_step(shares, normaliser)
            unserved = {key for r in results for key in r.unserved}
            if not unserved:
                break
            if attempt:
                raise KdlibError(f"teacher cache {self.cfg.teacher.cache}: {len(unserved)} sample(s) could not be "
                                 "read even after the teacher computed them again")
            handles = self.teacher.recompute(batches, handles, unserved)
        if colocate:
            self.students.sleep()
        end = time.perf_counter()
        began = self._last_step_end if self._last_step_end is not None else prepared.submitted_at
        self._last_step_end = end
        return {
            "skipped": float(results[0].skipped),  # the ranks agree
            "bad_sample_ids": [i for r in results for i in r.bad_sample_ids],
            "loss": sum(r.loss_sum for r in results) / normaliser,
            "kd_loss": sum(r.kd_sum for r in results) / normaliser,
            "ce_loss": sum(r.ce_sum for r in results) / normaliser,
            "lr": results[0].lr,
            "grad_norm": results[0].grad_norm,
            "tokens_per_s": sum(r.tokens for r in results) / (end - began + 1e-9),
            "loss_tokens": float(sum(r.loss_tokens for r in results)),
            "samples": float(prepared.samples),
            "micro_batches": float(len(batches)),
            "padding_micro_batches": float(plan.padding),
            # wall clock since the previous step ended: preparing, teacher, transport, students
            "step_seconds": end - began,
            "teacher_wait_seconds": waited,
            "teacher_seconds": teacher.seconds,
            "teacher_cached_batches": float(teacher.cached),
            # cached outputs the students could not read, computed again by the teacher
            "teacher_recomputed_batches": float(sum(a is not b for a, b in zip(teacher.handles, handles))),
            "student_seconds": max(r.student_seconds for r in results),
            "transport_bytes": float(sum(r.fetched_bytes for r in results)),
            "transport_seconds": max(r.fetch_seconds for r in results),
            **route_metrics(batches, results),  # several teachers: per route and per teacher
            # a reward objective: its policy-gradient term, -(1/N) sum_t w_t log p(y_t)
            **({} if results[0].pg_sum is None else {"pg_loss": sum(r.pg_sum for r in results) / normaliser}),
            **agreement_metrics(r.agreement for r in results),  # on-policy: rollout engine vs trainer
        }

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, step: int) -> Any:
        directory = self.checkpoints.save(step, {**self.bad_steps.state(), **self.teacher.state()})
        self._saved_step = step
        self._saved_at = time.monotonic()
        return directory

    def resume(self) -> int:
        """Restore ``train.resume``; returns the step it ended at (0 without resuming)."""
        resumed = self.checkpoints.resume()
        if resumed.step:
            self.bad_steps.restore(resumed.state)
            self.teacher.restore(resumed.state)
            self._saved_step = resumed.step if resumed.directory.parent == self.checkpoints.root else None
            if self.follows_student and not resumed.teacher_restored:
                self.update_teacher(ema_decay=None)
        return resumed.step


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
