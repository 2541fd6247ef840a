"""The off-policy controller loop: distil on a fixed dataset.

Per optimizer step: take a global batch, split it across student workers and into micro-batches,
have the teacher group score every micro-batch (hidden states at the loss positions, through the
transport), then have every student worker accumulate gradients over its micro-batches and step.
The loss normaliser is the number of loss tokens in the whole global batch, so the objective does
not depend on how the batch was split. Evaluation runs before and after training (and every
``eval.every_steps``); the final student is saved in Hugging Face format.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from kdlib.controller.dispatch import teacher_forward
from kdlib.controller.evaluator import Evaluator, comparison_table, print_table
from kdlib.data.batching import global_batches, micro_batches, split_across_workers
from kdlib.data.samples import Sample
from kdlib.tracking import MetricsWriter, plot_loss_curves, write_json

if TYPE_CHECKING:
    from kdlib.pipeline import Pipeline, RunResult

log = logging.getLogger(__name__)


class OffPolicyLoop:
    def __init__(self, pipeline: "Pipeline") -> None:
        self.p = pipeline
        self.cfg = pipeline.cfg

    def run(self) -> "RunResult":
        from kdlib.pipeline import RunResult

        p, cfg = self.p, self.cfg
        result = RunResult(run_dir=p.run_dir)
        evaluate = Evaluator(p)
        write_json(p.run_dir / "data_report.json", {k: r.as_dict() for k, r in p.data.reports.items()})
        if cfg.eval.before:
            result.eval_before = evaluate()
            if result.eval_before:
                log.info("eval before training: %s", _fmt(result.eval_before))
        writer = MetricsWriter(p.run_dir)
        batches = global_batches(
            p.data.train,
            batch_size=cfg.train.global_batch_size,
            epochs=cfg.train.epochs,
            shuffle=cfg.data.shuffle,
            seed=cfg.seed,
        )
        evals = []
        with tqdm(total=p.total_steps, desc="distilling", unit="step", disable=not cfg.logging.progress) as bar:
            for step in range(1, p.total_steps + 1):
                metrics = self.train_step(next(batches))
                metrics["step"] = step
                if step % cfg.logging.log_every == 0 or step == p.total_steps:
                    writer.write(metrics)
                    result.metrics = metrics
                bar.set_postfix(loss=f"{metrics['loss']:.4f}", kd=f"{metrics['kd_loss']:.4f}", refresh=False)
                bar.update(1)
                if cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < p.total_steps:
                    evals.append({"step": step, **(evaluate() or {})})
        writer.close()
        result.eval_after = evaluate()
        self._finish(result, writer, evals)
        return result

    def train_step(self, batch: list[Sample]) -> dict[str, float]:
        """One optimizer step on a global batch; per-token metrics of the step."""
        p = self.p
        start = time.perf_counter()
        shares = split_across_workers(batch, p.student.size)
        per_worker = [
            [p.data.collate(chunk) for chunk in micro_batches(share, self.cfg.train.micro_batch_size)]
            for share in shares
        ]
        normaliser = float(sum(mb.n_loss_tokens for mbs in per_worker for mb in mbs))
        flat = [mb for mbs in per_worker for mb in mbs]
        teacher_start = time.perf_counter()
        handles = teacher_forward(p.teacher, flat)
        teacher_wall = time.perf_counter() - teacher_start
        per_worker_handles, offset = [], 0
        for mbs in per_worker:
            per_worker_handles.append(handles[offset : offset + len(mbs)])
            offset += len(mbs)
        results = p.student.call_each(
            "train_step", [(mbs, hs, normaliser) for mbs, hs in zip(per_worker, per_worker_handles)]
        )
        step_seconds = time.perf_counter() - start
        total = {key: sum(r[key] for r in results) for key in ("loss_sum", "kd_sum", "ce_sum", "tokens", "loss_tokens", "fetched_bytes")}
        metrics = {
            "loss": total["loss_sum"] / normaliser,
            "kd_loss": total["kd_sum"] / normaliser,
            "ce_loss": total["ce_sum"] / normaliser,
            "lr": results[0]["lr"],
            "grad_norm": results[0]["grad_norm"],
            "tokens_per_s": total["tokens"] / step_seconds,
            "loss_tokens": total["loss_tokens"],
            "samples": float(len(batch)),
            "step_seconds": step_seconds,
            "teacher_seconds": teacher_wall,
            "student_seconds": max(r["student_seconds"] for r in results),
            "transport_bytes": total["fetched_bytes"],
            "transport_seconds": max(r["fetch_seconds"] for r in results),
        }
        if p.teacher is not None:
            p.teacher.call("take_stats")
        return metrics

    def _finish(self, result: "RunResult", writer: MetricsWriter, evals: list[dict]) -> None:
        p, cfg = self.p, self.cfg
        evaluation = {"before": result.eval_before, "during": evals, "after": result.eval_after}
        write_json(p.run_dir / "eval.json", evaluation)
        if result.eval_after:
            text = print_table(comparison_table(result.eval_before, result.eval_after))
            (p.run_dir / "eval.txt").write_text(text, encoding="utf-8")
        if cfg.logging.plot:
            plot = plot_loss_curves(writer.rows, p.run_dir / "plots" / "loss.png")
            if plot is not None:
                result.outputs["loss_plot"] = plot
        if cfg.save_student:
            student_dir = p.run_dir / "student"
            p.student.call_each("save", [(str(student_dir),)] + [(None,)] * (p.student.size - 1))
            p.student_tokenizer.save_pretrained(student_dir)
            result.student_dir = student_dir
            log.info("student saved to %s", student_dir)
        write_json(p.run_dir / "results.json", {
            "metrics": result.metrics,
            "eval_before": result.eval_before,
            "eval_after": result.eval_after,
            "student_dir": result.student_dir,
        })


def _fmt(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())
