"""Typed handles on the worker groups: what the controller can ask each role, and nothing else.

The controller never touches a worker and never names a method by string: it calls these handles
(``students.train_step(shares, normaliser)``), each of which passes the worker method itself to
its :class:`~kdlib.launch.base.WorkerGroup`, which the launcher turns into local calls or Ray
``.remote`` calls. Arguments and results are the workers' typed dataclasses; a call that needs
every worker's answer returns one per rank.
"""

from __future__ import annotations

from typing import Any, Optional

from kdlib.launch.base import WorkerCall, WorkerGroup
from kdlib.workers.rollout import RolloutWorker
from kdlib.workers.student import StepSums, StudentShare, StudentWorker
from kdlib.workers.teacher import TeacherResult, TeacherWorker


class _Handle:
    """A typed handle over one role's group."""

    def __init__(self, group: WorkerGroup) -> None:
        self.group = group

    @property
    def size(self) -> int:
        return self.group.size

    def run(self, fn: WorkerCall, *args: Any) -> list[Any]:
        """A backend's own worker call (``fn(worker, *args)``) on every worker."""
        return self.group.call(fn, *args)


class StudentGroup(_Handle):
    """The data-parallel student workers."""

    def setup(self, teacher_head: Any, total_steps: int, vocab_match: Any = None, teachers: Any = None) -> None:
        self.group.call(StudentWorker.setup, teacher_head, total_steps, vocab_match, teachers)

    def train_step(self, shares: list[StudentShare], normaliser: float) -> list[StepSums]:
        return self.group.call_each(StudentWorker.train_step, [(share, normaliser) for share in shares])

    def evaluate(self, shares: list[StudentShare]) -> list[Any]:
        return self.group.call_each(StudentWorker.evaluate, [(share,) for share in shares])

    def export_weights(self, bucket_bytes: int) -> list[Any]:
        """Transport handles of the full weights (gathered from the shards), rank 0's."""
        return [handle for handles in self.group.call(StudentWorker.export_weights, bucket_bytes) for handle in handles]

    def set_teacher_head(self, head: Any) -> None:
        self.group.call(StudentWorker.set_teacher_head, head)

    def save(self, path: str, dtype: Any = None) -> dict[str, str]:
        """The student in Hugging Face format at ``path`` (every rank gathers, rank 0 writes), its
        floating weights in ``dtype`` (None: as trained)."""
        return self.group.call_each(StudentWorker.save, [(path, dtype)] + [(None, dtype)] * (self.size - 1))[0]

    def save_checkpoint(self, directory: str, extra: dict[str, Any]) -> None:
        self.group.call(StudentWorker.save_checkpoint, directory, extra)

    def load_checkpoint(self, directory: str) -> None:
        self.group.call(StudentWorker.load_checkpoint, directory)

    def parameter_stats(self) -> list[dict[str, float]]:
        return self.group.call(StudentWorker.parameter_stats)

    def sleep(self) -> None:
        self.group.call(StudentWorker.sleep)

    def wake(self) -> None:
        self.group.call(StudentWorker.wake)


class TeacherGroup(_Handle):
    """The teacher replicas of one teacher."""

    def lm_head(self) -> Any:
        return self.group.call(TeacherWorker.lm_head)[0]

    def submit_forward(self, batches_per_worker: list[list[Any]], publish: bool = True) -> list[Any]:
        """Start scoring; one future per worker (see :meth:`gather_forward`)."""
        return self.group.submit_each(TeacherWorker.forward, [(batches, publish) for batches in batches_per_worker])

    def gather_forward(self, futures: list[Any]) -> list[TeacherResult]:
        return self.group.gather(futures, TeacherWorker.forward)

    def load_weights(self, handles: list[Any], ema_decay: Optional[float]) -> None:
        self.group.call(TeacherWorker.load_weights, handles, ema_decay)

    def save_weights(self, path: str) -> None:
        """Rank 0 writes the weights (the replicas hold the same ones)."""
        self.group.call_each(TeacherWorker.save_weights, [(path,)] + [(None,)] * (self.size - 1))

    def load_saved_weights(self, path: str) -> None:
        self.group.call(TeacherWorker.load_saved_weights, path)

    def sleep(self) -> None:
        self.group.call(TeacherWorker.sleep)

    def wake(self) -> None:
        self.group.call(TeacherWorker.wake)

    def load(self) -> None:
        self.group.call(TeacherWorker.load)

    def unload(self) -> None:
        self.group.call(TeacherWorker.unload)


class RolloutGroup(_Handle):
    """The generation engines."""

    def reserve(self, length: int) -> None:
        self.group.call(RolloutWorker.reserve, length)

    def generate(self, prompts_per_worker: list[list[list[int]]], stop_ids: set[int], pad_id: int, seeds: list[int],
                 images_per_worker: Optional[list[Any]] = None) -> list[list[Any]]:
        images = images_per_worker or [None] * len(prompts_per_worker)
        args = [(prompts, stop_ids, pad_id, seed, image)
                for prompts, seed, image in zip(prompts_per_worker, seeds, images, strict=True)]
        return self.group.call_each(RolloutWorker.generate, args)

    def load_weights(self, handles: list[Any]) -> None:
        self.group.call(RolloutWorker.load_weights, handles)
