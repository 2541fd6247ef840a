"""Updates skipped because the loss or the gradients were not finite: counted, and a limit.

The student workers skip a non-finite update on their own (all ranks agree, see
:mod:`kdlib.workers.student`); the controller keeps the count. Every step's metrics carry
``skipped`` (0 or 1) and ``skipped_steps`` (the run's total so far); a skipped step logs a warning
naming its samples. One bad batch is survivable, a diverged run is not: after
``train.max_bad_steps`` skipped steps in a row the run stops with a one-line
:class:`~kdlib.errors.TrainingError` naming the step and the sample ids of that step.
"""

from __future__ import annotations

import logging
from typing import Any

from kdlib.errors import TrainingError

log = logging.getLogger(__name__)


class BadSteps:
    def __init__(self, limit: int, *, total: int = 0, in_row: int = 0) -> None:
        self.limit = limit  # train.max_bad_steps
        self.total = total  # skipped steps of the run so far (restored on resume)
        self.in_row = in_row  # skipped steps since the last good one

    def record(self, step: int, metrics: dict[str, Any], sample_ids: list[int], bad_sample_ids: list[int]) -> None:
        """Count the step; add ``skipped_steps`` to ``metrics``; raise after too many in a row."""
        skipped = bool(metrics.get("skipped"))
        if skipped:
            self.total += 1
            self.in_row += 1
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
        log.warning("step %d: loss or gradients not finite (%s); update skipped (%d in a row, stop at "
                    "train.max_bad_steps=%d); %s", step, what, self.in_row, self.limit, where)

    def state(self) -> dict[str, int]:
        """What a checkpoint keeps, so a resumed run counts on."""
        return {"skipped_steps": self.total, "bad_steps_in_row": self.in_row}
