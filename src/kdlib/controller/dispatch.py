"""Getting teacher outputs for micro-batches: from the teacher cache, or from the teacher workers.

A micro-batch whose samples are all in the teacher cache gets a :class:`CachedOutput` handle, which
the student resolves from the cache files itself (the cache is a transport-like store). The others
go to the teacher group, largest first to the least-loaded worker (greedy longest-processing-time
scheduling), so workers finish together when sequence lengths vary; teacher workers with a cache
write what they compute into it. ``submit`` returns at once (Ray futures), so the controller can
prepare the next global batch while the students train on this one; ``collect`` returns the handles
in the original order.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

from kdlib.batch import MicroBatch
from kdlib.cache.shards import CachedOutput
from kdlib.data.batching import assign_by_cost
from kdlib.errors import KdlibError
from kdlib.workers.groups import TeacherGroup

if TYPE_CHECKING:
    from kdlib.cache.store import TeacherCache

log = logging.getLogger(__name__)


@dataclass
class TeacherJob:
    """Teacher work in flight: cached handles, and which worker scores which other micro-batch."""

    handles: list[Any]
    assignment: list[list[int]] = field(default_factory=list)
    futures: list[Any] = field(default_factory=list)


@dataclass
class TeacherOutputs:
    """The collected result of a job: handles in micro-batch order, and the busiest worker's time."""

    handles: list[Any]
    seconds: float = 0.0
    published_bytes: int = 0
    cached: int = 0  # micro-batches served by the cache


class TeacherDispatch:
    """The teacher side as the controller sees it: a worker group, a cache, or both (or neither:
    algorithms without a teacher get None handles). ``start_teacher`` loads teacher workers the
    first time a cached output turns out to be unreadable in a run the cache covered."""

    def __init__(self, group: Optional[TeacherGroup], cache: Optional["TeacherCache"] = None,
                 start_teacher: Optional[Callable[[], TeacherGroup]] = None) -> None:
        self.group = group
        self.cache = cache
        self.start_teacher = start_teacher

    @property
    def active(self) -> bool:
        return self.group is not None or self.cache is not None

    @property
    def workers(self) -> int:
        """Teacher workers scoring in parallel (1 when there are none)."""
        return self.group.size if self.group is not None else 1

    def submit(self, batches: list[MicroBatch], *, publish: bool = True) -> TeacherJob:
        """Start getting the outputs of ``batches`` (cached ones are answered at once)."""
        handles: list[Any] = [None] * len(batches)
        if not self.active:
            return TeacherJob(handles)
        to_score = []
        for i, batch in enumerate(batches):
            keys = batch.teacher_keys
            if self.cache is not None and keys is not None and not self.cache.missing(keys):
                handles[i] = CachedOutput(tuple(keys), tuple(batch.sample_ids), root=str(self.cache.root))
            else:
                to_score.append(i)
        if not to_score:
            return TeacherJob(handles)
        if self.group is None:
            raise KdlibError(
                f"{len(to_score)} micro-batch(es) are not in teacher.cache any more (a damaged shard was "
                "set aside); run again: the teacher will be loaded to recompute them"
            )
        costs = [batches[i].teacher_view.n_tokens for i in to_score]
        assignment = [[to_score[j] for j in idx] for idx in assign_by_cost(costs, self.group.size)]
        futures = self.group.submit_forward([[batches[i] for i in idx] for idx in assignment], publish)
        return TeacherJob(handles, assignment, futures)

    def collect(self, job: TeacherJob) -> TeacherOutputs:
        """The handles of a submitted job, in the order of its micro-batches."""
        handles = list(job.handles)
        cached = sum(isinstance(h, CachedOutput) for h in handles)
        if not job.futures:
            return TeacherOutputs(handles, cached=cached)
        results = self.group.gather_forward(job.futures)
        for indices, result in zip(job.assignment, results):
            for index, handle in zip(indices, result.handles):
                handles[index] = handle
        if self.cache is not None:
            self.cache.refresh()  # learn the shards the teacher workers just wrote
        return TeacherOutputs(
            handles,
            seconds=max(r.seconds for r in results),
            published_bytes=sum(r.published_bytes for r in results),
            cached=cached,
        )

    def recompute(self, batches: list[MicroBatch], handles: list[Any], unserved: set[str]) -> list[Any]:
        """``handles`` with the cached outputs holding an ``unserved`` key (a student could not
        read them: missing, or damaged and set aside) replaced by the teacher's, computed again
        now (the teacher workers store them in the cache again). Loads the teacher if the run
        had none."""
        redo = [i for i, h in enumerate(handles) if isinstance(h, CachedOutput) and unserved & set(h.keys)]
        if not redo:
            raise KdlibError(f"teacher cache: the students could not read {len(unserved)} sample(s) that no "
                             "micro-batch of this step holds")
        self.cache.forget(unserved)
        if self.group is None:
            if self.start_teacher is None:
                raise KdlibError(f"teacher cache: {len(unserved)} sample(s) could not be read and no teacher can be loaded")
            log.warning("teacher cache %s: %d sample(s) could not be read (missing or damaged); loading the teacher "
                        "to compute them again", self.cache.root, len(unserved))
            self.group = self.start_teacher()
        else:
            log.warning("teacher cache %s: %d sample(s) could not be read (missing or damaged); the teacher computes "
                        "them again", self.cache.root, len(unserved))
        job = self.submit([batches[i] for i in redo])
        new = self.collect(job).handles
        out = list(handles)
        for i, handle in zip(redo, new, strict=True):
            out[i] = handle
        return out

    def outputs(self, batches: list[MicroBatch]) -> list[Any]:
        """Handles of the outputs of ``batches``, in their order (None: no teacher)."""
        return self.collect(self.submit(batches)).handles

    def wake(self) -> None:
        """Colocation: the teacher takes the devices back for its phase."""
        if self.group is not None:
            self.group.wake()

    def sleep(self) -> None:
        if self.group is not None:
            self.group.sleep()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the teacher side (nothing for one teacher)."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume from a checkpoint's trainer state (nothing to do for one teacher)."""
