"""Updates skipped because the loss or the gradients were not finite: counted, and a limit.

The student workers skip a non-finite update on their own (all ranks agree, see
:mod:`kdlib.workers.student`); the controller keeps the count. Every step's metrics carry
``skipped`` (0 or 1) and ``skipped_steps`` (the run's total so far); a skipped step logs a warning
naming its samples. One bad batch is survivable, a diverged run is not: after
``train.max_bad_steps`` skipped steps in a row, or once more than ``train.max_skipped_fraction`` of
the run's steps have been skipped, the run stops with a one-line
:class:`~kdlib.errors.TrainingError` naming the step and the sample ids of that step (the weights
are those of the last good update, so the training loop checkpoints them first). The end of the
run reports how many updates were skipped, and which.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from kdlib.errors import TrainingError

log = logging.getLogger(__name__)


class BadSteps:
    def __init__(self, limit: int, *, max_fraction: float = 1.0, run_steps: int = 0, total: int = 0,
                 in_row: int = 0, steps: Optional[list[int]] = None) -> None:
        self.limit = limit  # train.max_bad_steps
        # train.max_skipped_fraction of the run's steps: more skipped steps than this stop the run
        self.allowed = max_fraction * run_steps if run_steps else float("inf")
        self.max_fraction = max_fraction
        self.total = total  # skipped steps of the run so far (restored on resume)
        self.in_row = in_row  # skipped steps since the last good one
        self.steps: list[int] = list(steps or [])  # which steps were skipped

    def record(self, step: int, metrics: dict[str, Any], sample_ids: list[int], bad_sample_ids: list[int]) -> None:
        """Count the step; add ``skipped_steps`` to ``metrics``; raise after too many in a row."""
        skipped = bool(metrics.get("skipped"))
        if skipped:
            self.total += 1
            self.in_row += 1
            self.steps.append(step)
        else:
            self.in_row = 0
        metrics["skipped_steps"] = float(self.total)
        if not skipped:
            return
        where = f"samples {sorted(sample_ids)}"
        if bad_sample_ids:
            where += f" (loss not finite in samples {sorted(set(bad_sample_ids))})"
        what = f"loss={metrics.get('loss')}, grad_norm={metrics.get('grad_norm')}"
        if self.in_row >= self.limit:
            raise TrainingError(
                f"step {step}: loss or gradients not finite ({what}) for {self.in_row} steps in a row "
                f"(train.max_bad_steps={self.limit}); {where}"
            )
        if self.total > self.allowed:
            raise TrainingError(
                f"step {step}: {self.total} of the run's updates were skipped (loss or gradients not finite, "
                f"steps {self.steps}), more than train.max_skipped_fraction={self.max_fraction:g} allows; {where}"
            )
        log.warning("step %d: loss or gradients not finite (%s); update skipped (%d in a row, stop at "
                    "train.max_bad_steps=%d); %s", step, what, self.in_row, self.limit, where)

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps, so a resumed run counts on."""
        return {"skipped_steps": self.total, "bad_steps_in_row": self.in_row, "skipped_step_list": self.steps}

    def restore(self, state: dict[str, Any]) -> None:
        self.total = int(state.get("skipped_steps", 0))
        self.in_row = int(state.get("bad_steps_in_row", 0))
        self.steps = [int(s) for s in state.get("skipped_step_list", [])]

    def summary(self, steps_done: int) -> Optional[str]:
        """One line for the end of the run, or None when every update was applied."""
        if not self.total:
            return None
        return (f"{self.total} of {steps_done} updates were skipped (loss or gradients not finite): steps "
                f"{self.steps}")
