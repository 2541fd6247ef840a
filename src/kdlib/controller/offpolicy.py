"""The off-policy controller loop: distil on a fixed dataset's responses (and SFT, without teacher).

The global batches are data.train's samples in a seeded order; everything else (planning, teacher,
students, checkpoints, evaluation) is the shared :class:`~kdlib.controller.training.TrainingLoop`.
"""

from __future__ import annotations

from typing import Iterator

from kdlib.controller.training import TrainingLoop
from kdlib.data.samples import Sample


class OffPolicyLoop(TrainingLoop):
    def sample_batches(self, skip: int = 0) -> Iterator[list[Sample]]:
        return self.dataset_batches(skip)
