"""The end of a training run: the held-out table, the loss plot, the saved student, results.json.

Shared by every training mode; what it writes is listed in the README's run-directory table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kdlib.config.schema import KDConfig
from kdlib.controller.evaluator import comparison_table, print_table
from kdlib.result import RunResult
from kdlib.tracking import plot_loss_curves, write_json
from kdlib.tracking.trackers import Trackers

if TYPE_CHECKING:
    from kdlib.controller.checkpointing import Checkpoints

log = logging.getLogger(__name__)


def finish_training(
    cfg: KDConfig, run_dir: Path, trackers: Trackers, checkpoints: "Checkpoints", total_steps: int,
    result: RunResult, rows: list[dict[str, Any]], evals: list[dict],
) -> None:
    """Write eval.json / eval.txt, plots/loss.png, student/ and results.json; fill ``result``."""
    write_json(run_dir / "eval.json", {"before": result.eval_before, "during": evals, "after": result.eval_after})
    if result.eval_after:
        text = print_table(comparison_table(result.eval_before, result.eval_after))
        (run_dir / "eval.txt").write_text(text, encoding="utf-8")
        trackers.log_eval_table(result.eval_before, result.eval_after, total_steps)
    if cfg.logging.plot:
        plot = plot_loss_curves(rows, run_dir / "plots" / "loss.png")
        if plot is not None:
            result.outputs["loss_plot"] = plot
            trackers.log_image("plots/loss", plot, total_steps)
    if cfg.save_student:
        outputs = checkpoints.save_student(run_dir / "student")
        for name, directory in outputs.items():  # student/ and, with LoRA, student_adapter/ ...
            result.outputs[name] = directory
            log.info("%s saved to %s", name, directory)
        result.student_dir = outputs["student"]
    write_json(run_dir / "results.json", {
        "metrics": result.metrics,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "student_dir": result.student_dir,
    })
