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
checkpoints are written every ``train.checkpoint_every`` steps and ``train.resume`` continues from
one (same data order: the seeded batch sequence is replayed up to the checkpoint's step).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from abc import abstractmethod
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from tqdm.auto import tqdm

from kdlib.batch import MicroBatch
from kdlib.config.schema import KDConfig
from kdlib.controller.dispatch import TeacherJob, collect_teacher, submit_teacher
from kdlib.controller.evaluator import Evaluator, comparison_table, print_table
from kdlib.controller.mode import RunMode
from kdlib.data.batching import StepPlan, global_batches, plan_step
from kdlib.data.samples import Sample
from kdlib.errors import ConfigError
from kdlib.parallel.checkpoint import is_complete, latest_checkpoint, mark_complete
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
    teacher: Optional[TeacherJob]
    submitted_at: float


class TrainingLoop(RunMode):
    """The optimizer-step loop of the training modes (off-policy, SFT, on-policy)."""

    @classmethod
    def check(cls, cfg: KDConfig) -> None:
        if cfg.student.model in (None, "???"):
            raise ConfigError("student.model is not set")

    def __init__(self, pipeline: "Pipeline") -> None:
        super().__init__(pipeline)
        self._last_step_end: Optional[float] = None  # wall clock per step includes preparing it
        self.evaluate = Evaluator(pipeline)

    def run(self) -> RunResult:
        p, cfg = self.p, self.cfg
        result = RunResult(run_dir=p.run_dir)
        evaluate = self.evaluate
        write_json(p.run_dir / "data_report.json", {k: r.as_dict() for k, r in p.data.reports.items()})
        first_step = self.resume() + 1
        if cfg.eval.before and first_step == 1:
            result.eval_before = evaluate()
            if result.eval_before:
                log.info("eval before training: %s", _fmt(result.eval_before))
                p.trackers.log_eval(result.eval_before, step=0)
        writer = MetricsWriter(p.run_dir, p.trackers)
        self.start(first_step)
        batches = self.sample_batches(skip=first_step - 1)
        self._last_step_end = time.perf_counter()
        pending: deque[PreparedStep] = deque()
        evals = []
        with tqdm(total=p.total_steps, initial=first_step - 1, desc="distilling", unit="step",
                  disable=not cfg.logging.progress) as bar:
            for step in range(first_step, p.total_steps + 1):
                while len(pending) < cfg.pipeline.prefetch + 1:
                    samples = next(batches, None)
                    if samples is None:
                        break
                    pending.append(self.prepare(samples))
                metrics = self.train(pending.popleft())
                metrics.update(self.after_step(step))
                metrics["step"] = step
                if step % cfg.logging.log_every == 0 or step == p.total_steps:
                    writer.write(metrics)
                    result.metrics = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", kd=f"{metrics['kd_loss']:.4f}", refresh=False)
                bar.update(1)
                if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0:
                    self.save_checkpoint(step)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < p.total_steps:
                    during = evaluate()
                    p.trackers.log_eval(during, step)
                    evals.append({"step": step, **(during or {})})
        writer.close()
        result.eval_after = evaluate()
        p.trackers.log_eval(result.eval_after, p.total_steps)
        self._finish(result, writer, evals)
        return result

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
        """Before the first step (of this process): a resumed self-distillation teacher catches up."""
        if first_step > 1 and self._teacher_follows_student():
            log.warning("resumed: the self-distillation teacher restarts from the resumed student's weights")
            self.update_teacher(ema_decay=None)

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
        p, train = self.p, self.cfg.train
        plan = plan_step(
            samples, p.student.size, micro_batch_size=train.micro_batch_size,
            max_tokens=train.max_tokens_per_micro_batch, packing=train.packing,
        )
        batches = [p.data.collate(chunk, packing=train.packing) for chunk in plan.micro_batches]
        if self.cfg.pipeline.colocate and p.teacher is not None:
            p.teacher.call("wake")
        job = submit_teacher(p.teacher, batches)
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
        teacher = collect_teacher(p.teacher, prepared.teacher, len(prepared.batches))
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
            "student_seconds": max(r["student_seconds"] for r in results),
            "transport_bytes": total["fetched_bytes"],
            "transport_seconds": max(r["fetch_seconds"] for r in results),
        }

    # ------------------------------------------------------------------------------------------
    # Checkpoints

    def save_checkpoint(self, step: int) -> Path:
        directory = self.p.run_dir / "checkpoints" / f"step_{step}"
        self.p.student.call("save_checkpoint", str(directory), {"step": step})
        write_json(directory / "trainer_state.json", {"step": step, "total_steps": self.p.total_steps, "seed": self.cfg.seed})
        mark_complete(directory)
        log.info("checkpoint saved: %s", directory)
        kept = sorted(
            (int(d.name.split("_")[1]), d) for d in directory.parent.glob("step_*") if is_complete(d)
        )
        for _, old in kept[: -self.cfg.train.keep_checkpoints]:
            shutil.rmtree(old, ignore_errors=True)
        return directory

    def resume(self) -> int:
        """Restore ``train.resume``; returns the step it ended at (0 without resuming)."""
        source = self.cfg.train.resume
        if not source:
            return 0
        path = Path(source)
        directory = path if is_complete(path) else latest_checkpoint(path)
        if directory is None:
            raise ConfigError(f"train.resume: no complete checkpoint in {path}")
        state = json.loads((directory / "trainer_state.json").read_text())
        self.p.student.call("load_checkpoint", str(directory))
        log.info("resumed from %s (step %d)", directory, state["step"])
        return int(state["step"])

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
            student_dir = p.run_dir / "student"
            saved = p.student.call_each("save", [(str(student_dir),)] + [(None,)] * (p.student.size - 1))[0]
            for name, directory in saved.items():  # student/ and, with LoRA, student_adapter/
                p.student_tokenizer.save_pretrained(directory)
                result.outputs[name] = Path(directory)
                log.info("%s saved to %s", name, directory)
            result.student_dir = student_dir
        write_json(p.run_dir / "results.json", {
            "metrics": result.metrics,
            "eval_before": result.eval_before,
            "eval_after": result.eval_after,
            "student_dir": result.student_dir,
        })


def _fmt(metrics: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
