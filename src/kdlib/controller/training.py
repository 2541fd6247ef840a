"""The training loop shared by off-policy and on-policy distillation: one optimizer step at a time.

A subclass says where each global batch of samples comes from (:meth:`TrainingLoop.sample_batches`:
the dataset, or the student's own rollouts) and what happens after a step (:meth:`after_step`:
weight sync). Everything else is here, once. Per optimizer step: plan the global batch across
student workers and into micro-batches (``data.batching.plan_step``), have the teacher group score
every micro-batch (hidden states at the loss positions, through the transport), then have every
student worker accumulate gradients over its micro-batches and step. The loss normaliser is the
number of loss tokens in the whole global batch, so the objective does not depend on the split.

With ``pipeline.prefetch=k`` the teacher scores up to k global batches ahead while the students
train; with ``pipeline.colocate`` the two phases take turns and free the devices for each other.
A self-distillation teacher (``teacher.from_student``) is refreshed from the student every
``teacher.update_freq`` steps or averaged with ``teacher.ema_decay`` after every step. Training
checkpoints (``controller/checkpointing.py``) are written every ``train.checkpoint_every`` steps
and ``train.resume`` continues from one (same data order: the seeded batch sequence is replayed up
to the checkpoint's step). A SIGINT or SIGTERM stops the loop after the current step with a
checkpoint and the command that resumes (``controller/interrupt.py``); a step whose loss or
gradients are not finite is skipped and counted (``controller/bad_steps.py``).
"""

from __future__ import annotations

import logging
import time
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from kdlib.batch import MicroBatch
from kdlib.config.schema import KDConfig
from kdlib.controller.bad_steps import BadSteps
from kdlib.controller.checkpointing import Checkpoints
from kdlib.controller.dispatch import TeacherDispatch, TeacherJob
from kdlib.controller.evaluator import Evaluator, comparison_table, print_table
from kdlib.controller.interrupt import StopRequests
from kdlib.controller.mode import RunMode
from kdlib.data.batching import StepPlan, global_batches
from kdlib.data.samples import Sample
from kdlib.errors import ConfigError, Interrupted
from kdlib.progress import progress
from kdlib.result import RunResult
from kdlib.tracking import MetricsWriter, plot_loss_curves, write_json

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
        self._last_step_end: Optional[float] = None  # wall clock per step includes preparing it
        self.teacher = TeacherDispatch(pipeline.teacher, pipeline.cache)
        self.evaluate = Evaluator(pipeline, self.teacher)
        self.checkpoints = Checkpoints(pipeline, teacher_follows_student=self._teacher_follows_student())
        self.bad_steps = BadSteps(pipeline.cfg.train.max_bad_steps)
        self.stop = StopRequests()

    def run(self) -> RunResult:
        p, cfg = self.p, self.cfg
        result = RunResult(run_dir=p.run_dir)
        evaluate = self.evaluate
        write_json(p.run_dir / "data_report.json", {k: r.as_dict() for k, r in p.data.reports.items()})
        evals: list[dict] = []
        with self.stop:
            first_step = self.resume() + 1
            if cfg.eval.before and first_step == 1:
                result.eval_before = evaluate()
                if result.eval_before:
                    log.info("eval before training: %s", _fmt(result.eval_before))
                    p.trackers.log_eval(result.eval_before, step=0)
            self._stop_if_requested(first_step - 1)
            writer = MetricsWriter(p.run_dir, p.trackers)
            try:
                self.start(first_step)
                self._train_steps(first_step, writer, result, evals)
            finally:
                writer.close()
            self._stop_if_requested(p.total_steps, saved=self._saved_step)
        result.eval_after = evaluate()
        p.trackers.log_eval(result.eval_after, p.total_steps)
        self._finish(result, writer, evals)
        return result

    def _train_steps(self, first_step: int, writer: MetricsWriter, result: RunResult, evals: list[dict]) -> None:
        """Steps ``first_step`` .. ``total_steps``; stops early (with a checkpoint) when asked to."""
        p, cfg = self.p, self.cfg
        batches = self.sample_batches(skip=first_step - 1)
        self._last_step_end = time.perf_counter()
        pending: deque[PreparedStep] = deque()
        with progress("distilling", total=p.total_steps, unit="step", initial=first_step - 1,
                      enabled=cfg.logging.progress) as bar:
            for step in range(first_step, p.total_steps + 1):
                while len(pending) < cfg.pipeline.prefetch + 1:
                    samples = next(batches, None)
                    if samples is None:
                        break
                    pending.append(self.prepare(samples))
                prepared = pending.popleft()
                metrics = self.train(prepared)
                metrics.update(self.after_step(step))
                metrics["step"] = step
                self.bad_steps.record(step, metrics, prepared.sample_ids, metrics.pop("bad_sample_ids"))
                if step % cfg.logging.log_every == 0 or step == p.total_steps:
                    writer.write(metrics)
                    result.metrics = metrics
                bar.set_postfix(loss=metrics["loss"], kd=metrics["kd_loss"])
                bar.update(1)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint(step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < p.total_steps:
                    during = self.evaluate()
                    p.trackers.log_eval(during, step)
                    evals.append({"step": step, **(during or {})})
                if step < p.total_steps:
                    self._stop_if_requested(step, saved=self._saved_step)

    def _stop_if_requested(self, step: int, saved: Optional[int] = None) -> None:
        """After a SIGINT/SIGTERM: write a checkpoint of ``step`` (unless ``saved`` is it) and stop."""
        if not self.stop.requested:
            return
        name, total = self.stop.signal_name, self.p.total_steps
        if step < 1 or self.p.run_dir is None:
            raise Interrupted(f"interrupted by {name} before the first training step; nothing to resume",
                              signal_number=self.stop.signal_number, resume_dir=None)
        directory = self.checkpoints.latest() if saved == step else self.save_checkpoint(step)
        raise Interrupted(f"interrupted by {name} after step {step}/{total}; checkpoint {directory}",
                          signal_number=self.stop.signal_number, resume_dir=str(self.p.run_dir))

    @abstractmethod
    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        """The global batches of samples to train on, after the first ``skip`` (resumed) steps."""

    def dataset_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        """Global batches of data.train's samples (a seeded order per epoch, epochs repeating for
        as long as the run asks), after the first ``skip``."""
        cfg = self.cfg
        stream = global_batches(
            self.p.data.train, batch_size=cfg.train.global_batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
        )
        for _ in range(skip):
            next(stream)
        return stream

    def start(self, first_step: int) -> None:
        """Before the first step of this process (after :meth:`resume`); subclasses add to it."""

    def after_step(self, step: int) -> dict[str, float]:
        """After each optimizer step: update a self-distillation teacher; extra metrics."""
        teacher = self.cfg.teacher
        if teacher.ema_decay is not None:
            return {"teacher_update_seconds": self.update_teacher(ema_decay=teacher.ema_decay)}
        if teacher.update_freq and step % teacher.update_freq == 0:
            return {"teacher_update_seconds": self.update_teacher(ema_decay=None)}
        return {}

    def export_student_weights(self) -> list[Any]:
        """Transport handles of the student's full weights (gathered from the shards)."""
        per_rank = self.p.student.call("export_weights", self.cfg.onpolicy.sync_bucket_mb * 2**20)
        return [handle for handles in per_rank for handle in handles]

    def update_teacher(self, *, ema_decay: Optional[float]) -> float:
        """Copy (or average in) the student's weights into the teacher; seconds spent."""
        start = time.perf_counter()
        handles = self.export_student_weights()
        self.p.teacher.call("load_weights", handles, ema_decay)
        self.p.student.call("set_teacher_head", self.p.teacher.call("lm_head")[0])
        self.evaluate.invalidate()  # the cached eval teacher outputs are stale now
        return time.perf_counter() - start

    def _teacher_follows_student(self) -> bool:
        return self.p.teacher is not None and (self.cfg.teacher.ema_decay is not None or self.cfg.teacher.update_freq > 0)

    def prepare(self, samples: list[Sample]) -> PreparedStep:
        """Plan a global batch, collate its micro-batches and start the teacher on them."""
        p = self.p
        plan, batches = p.data.step_batches(samples, self.cfg.train, p.student.size)
        if self.cfg.pipeline.colocate and p.teacher is not None:
            p.teacher.call("wake")
        job = self.teacher.submit(batches)
        return PreparedStep(len(samples), plan, batches, job, time.perf_counter())

    def step(self, samples: list[Sample], step: int = 1) -> dict[str, float]:
        """One optimizer step on a global batch (no prefetch), then :meth:`after_step`; metrics."""
        self._last_step_end = time.perf_counter()
        metrics = self.train(self.prepare(samples))
        metrics.update(self.after_step(step))
        return metrics

    def train(self, prepared: PreparedStep) -> dict[str, float]:
        """Collect the teacher outputs of a prepared step and run the students' optimizer step."""
        p, colocate = self.p, self.cfg.pipeline.colocate
        start = time.perf_counter()
        teacher = self.teacher.collect(prepared.teacher)
        handles = teacher.handles
        waited = time.perf_counter() - start
        if colocate and p.teacher is not None:
            p.teacher.call("sleep")
            p.student.call("wake")
        plan, batches = prepared.plan, prepared.batches
        normaliser = float(sum(b.n_loss_tokens for b in batches))
        args = [
            ([batches[i] for i, _ in entries], [handles[i] for i, _ in entries], normaliser, [w for _, w in entries])
            for entries in plan.per_worker
        ]
        results = p.student.call_each("train_step", args)
        if colocate:
            p.student.call("sleep")
        end = time.perf_counter()
        began = self._last_step_end if self._last_step_end is not None else prepared.submitted_at
        self._last_step_end = end
        total = {k: sum(r[k] for r in results) for k in ("loss_sum", "kd_sum", "ce_sum", "tokens", "loss_tokens", "fetched_bytes")}
        return {
            "skipped": results[0]["skipped"],  # the ranks agree
            "bad_sample_ids": [i for r in results for i in r["bad_sample_ids"]],
            "loss": total["loss_sum"] / normaliser,
            "kd_loss": total["kd_sum"] / normaliser,
            "ce_loss": total["ce_sum"] / normaliser,
            "lr": results[0]["lr"],
            "grad_norm": results[0]["grad_norm"],
            "tokens_per_s": total["tokens"] / (end - began + 1e-9),
            "loss_tokens": total["loss_tokens"],
            "samples": float(prepared.samples),
            "micro_batches": float(len(batches)),
            "padding_micro_batches": float(plan.padding),
            # wall clock since the previous step ended: preparing, teacher, transport, students
            "step_seconds": end - began,
            "teacher_wait_seconds": waited,
            "teacher_seconds": teacher.seconds,
            "teacher_cached_batches": float(teacher.cached),
            "student_seconds": max(r["student_seconds"] for r in results),
            "transport_bytes": total["fetched_bytes"],
            "transport_seconds": max(r["fetch_seconds"] for r in results),
        }

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    _saved_step: Optional[int] = None  # the step of the last checkpoint this process wrote

    def save_checkpoint(self, step: int) -> Path:
        directory = self.checkpoints.save(step, self.bad_steps.state())
        self._saved_step = step
        return directory

    def resume(self) -> int:
        """Restore ``train.resume``; returns the step it ended at (0 without resuming)."""
        resumed = self.checkpoints.resume()
        if resumed.step:
            self.bad_steps.total = int(resumed.state.get("skipped_steps", 0))
            self.bad_steps.in_row = int(resumed.state.get("bad_steps_in_row", 0))
            if self._teacher_follows_student() and not resumed.teacher_restored:
                self.update_teacher(ema_decay=None)
        return resumed.step

    def _finish(self, result: RunResult, writer: MetricsWriter, evals: list[dict]) -> None:
        p, cfg = self.p, self.cfg
        evaluation = {"before": result.eval_before, "during": evals, "after": result.eval_after}
        write_json(p.run_dir / "eval.json", evaluation)
        if result.eval_after:
            text = print_table(comparison_table(result.eval_before, result.eval_after))
            (p.run_dir / "eval.txt").write_text(text, encoding="utf-8")
            p.trackers.log_eval_table(result.eval_before, result.eval_after, p.total_steps)
        if cfg.logging.plot:
            plot = plot_loss_curves(writer.rows, p.run_dir / "plots" / "loss.png")
            if plot is not None:
                result.outputs["loss_plot"] = plot
                p.trackers.log_image("plots/loss", plot, p.total_steps)
        if cfg.save_student:
            outputs = self.checkpoints.save_student(p.run_dir / "student")
            for name, directory in outputs.items():  # student/ and, with LoRA, student_adapter/ ...
                result.outputs[name] = directory
                log.info("%s saved to %s", name, directory)
            result.student_dir = outputs["student"]
        write_json(p.run_dir / "results.json", {
            "metrics": result.metrics,
            "eval_before": result.eval_before,
            "eval_after": result.eval_after,
            "student_dir": result.student_dir,
        })


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
