"""The end of a training run: the held-out table, the loss (and reward) plot, the saved student, results.json.

Shared by every training mode; what it writes is listed in the README's run-directory table.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from kdlib.config.schema import KDConfig
from kdlib.controller.evaluator import comparison_table, print_table
from kdlib.controller.teacher_metrics import teacher_table
from kdlib.errors import CheckpointError
from kdlib.result import RunResult
from kdlib.tracking import plot_loss_curves, plot_reward_curves, write_json
from kdlib.tracking.records import directory_bytes, human_bytes
from kdlib.tracking.trackers import Trackers

if TYPE_CHECKING:
    from kdlib.controller.bad_steps import BadSteps
    from kdlib.controller.checkpointing import Checkpoints

log = logging.getLogger(__name__)


def finish_training(
    cfg: KDConfig, run_dir: Path, trackers: Trackers, checkpoints: "Checkpoints", total_steps: int,
    result: RunResult, rows: list[dict[str, Any]], evals: list[dict], *, skipped: "BadSteps",
    saved_step: Optional[int],
) -> None:
    """Write eval.json / eval.txt, plots/loss.png, student/ and results.json; fill ``result``.
    ``saved_step``: the step of the newest checkpoint of this run (None: none of the last step)."""
    write_json(run_dir / "eval.json", {"before": result.eval_before, "during": evals, "after": result.eval_after})
    skipped_line = skipped.summary(total_steps)
    if skipped_line:
        log.warning("%s", skipped_line)
    if result.eval_after:
        table = comparison_table(result.eval_before, result.eval_after,
                                 notes={"updates skipped (not finite)": f"{skipped.total} of {total_steps}"})
        text = print_table(table)
        per_teacher = teacher_table(result.eval_before, result.eval_after)
        if per_teacher is not None:  # several teachers: a row per teacher
            text += print_table(per_teacher)
        (run_dir / "eval.txt").write_text(text, encoding="utf-8")
        trackers.log_eval_table(result.eval_before, result.eval_after, total_steps)
    if cfg.logging.plot:
        plot = plot_loss_curves(rows, run_dir / "plots" / "loss.png")
        if plot is not None:
            result.outputs["loss_plot"] = plot
            trackers.log_image("plots/loss", plot, total_steps)
        plot = plot_reward_curves(rows, run_dir / "plots" / "reward.png")
        if plot is not None:  # on-policy with a reward
            result.outputs["reward_plot"] = plot
            trackers.log_image("plots/reward", plot, total_steps)
    if cfg.save_student:
        outputs = _save_student(checkpoints, run_dir, total_steps, saved_step, skipped.state())
        for name, directory in outputs.items():  # student/ and, with LoRA, student_adapter/ ...
            result.outputs[name] = directory
            log.info("%s saved to %s (%s, %s)", name, directory, human_bytes(directory_bytes(directory)),
                     cfg.save_dtype.value)
        result.student_dir = outputs["student"]
    else:
        log.info("the student is not saved (save_student=false); its held-out results are in eval.json")
    write_json(run_dir / "results.json", {
        "metrics": result.metrics,
        "eval_before": result.eval_before,
        "eval_after": result.eval_after,
        "student_dir": result.student_dir,
        "skipped_steps": skipped.steps,
    })
    log.info("run directory %s: %s written", run_dir, human_bytes(directory_bytes(run_dir)))


def _save_student(checkpoints: "Checkpoints", run_dir: Path, step: int, saved_step: Optional[int],
                  trainer_state: dict[str, Any]) -> dict[str, Path]:
    """The final student; when that fails (a full disk), the trained weights are kept as a
    checkpoint if one can be written, and the one-line error says how to save the student again."""
    try:
        return checkpoints.save_student(run_dir / "student")
    except CheckpointError as exc:
        if saved_step == step:
            kept = f"the trained weights are in checkpoint {checkpoints.latest()}"
        else:
            try:
                kept = f"the trained weights were saved as checkpoint {checkpoints.save(step, trainer_state)}"
            except CheckpointError as also:
                raise CheckpointError(f"{exc}; the trained weights could not be kept either ({also})") from None
        raise CheckpointError(f"{exc}; {kept}; once there is room, run the same command with "
                              f"train.resume={run_dir}: it saves the student without training again") from None
