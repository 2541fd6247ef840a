"""Getting teacher outputs when a run has several teachers: each micro-batch to its route's teachers.

:class:`RoutedDispatch` is what the training loop, the evaluator and the cache fill call in a
routed run, with the methods of a one-teacher :class:`~kdlib.controller.dispatch.TeacherDispatch`.
Each teacher has its own ``TeacherDispatch`` (its worker group, its cache); a micro-batch goes to
the dispatch of its route's teacher, and an ensemble's micro-batch also goes, as each other member
reads it, to that member's dispatch; a micro-batch holding several targets goes part by part. The
answers come back in micro-batch order: a handle for a one-teacher micro-batch,
:class:`~kdlib.routing.MemberHandles` for an ensemble's, :class:`~kdlib.routing.PartHandles` (one
of those per part) for a micro-batch of several targets. Teachers score
in parallel where they have their own workers (Ray); with ``routing.take_turns`` each teacher's
work of a call is done in its turn (the resident teacher first, so a step loads each other teacher
at most once) and collected before the next teacher loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kdlib.batch import MicroBatch
from kdlib.cache.shards import CachedOutput
from kdlib.controller.dispatch import TeacherDispatch, TeacherJob, TeacherOutputs
from kdlib.controller.teachers import Teachers
from kdlib.routing import MemberHandles, join_handles, per_batch, split_parts

RESIDENT = "resident_teacher"  # the key of the resident teacher in a checkpoint's trainer state


@dataclass
class RoutedJob:
    """Teacher work in flight: per teacher, its (part index, view) items and its job, or its
    outputs already collected (a turn); the micro-batches, to put their parts' handles together."""

    batches: list[MicroBatch]
    work: dict[str, list[tuple[int, MicroBatch]]]
    jobs: dict[str, TeacherJob] = field(default_factory=dict)
    done: dict[str, TeacherOutputs] = field(default_factory=dict)


class RoutedDispatch:
    def __init__(self, teachers: Teachers) -> None:
        self.teachers = teachers
        self.parts = {
            name: TeacherDispatch(teachers.groups.get(name), teachers.caches[name],
                                  start_teacher=lambda name=name: teachers.turn(name))
            for name in teachers.names
        }

    @property
    def active(self) -> bool:
        return True

    @property
    def workers(self) -> int:
        return max((part.workers for part in self.parts.values()), default=1)

    def submit(self, batches: list[MicroBatch], *, publish: bool = True) -> RoutedJob:
        """Start getting the outputs of ``batches`` from their teachers (see the module docstring)."""
        work: dict[str, list[tuple[int, MicroBatch]]] = {}
        for index, part in enumerate(split_parts(batches)[0]):
            for member in part.route.members:
                work.setdefault(member, []).append((index, part.route.view(part, member)))
        job = RoutedJob(batches, work)
        for name in self.teachers.order(list(work)):
            part, views = self.parts[name], [view for _, view in work[name]]
            if self.teachers.take_turns and self._computes(part, views):
                part.group = self.teachers.turn(name)
                job.done[name] = part.collect(part.submit(views, publish=publish))
            else:
                if part.group is None and self._computes(part, views):
                    part.group = self.teachers.turn(name)
                job.jobs[name] = part.submit(views, publish=publish)
        return job

    @staticmethod
    def _computes(part: TeacherDispatch, views: list[MicroBatch]) -> bool:
        """Whether some of ``views`` are not all in the teacher's cache (its model must run)."""
        cache = part.cache
        return cache is None or any(v.teacher_keys is None or cache.missing(v.teacher_keys) for v in views)

    def collect(self, job: RoutedJob) -> TeacherOutputs:
        """The handles of a submitted job in micro-batch order (:class:`PartHandles` for a
        micro-batch of several targets); times and bytes added over teachers."""
        found: dict[tuple[int, str], Any] = {}
        seconds, sent = 0.0, 0
        for name, items in job.work.items():
            out = job.done[name] if name in job.done else self.parts[name].collect(job.jobs[name])
            for (index, _), handle in zip(items, out.handles, strict=True):
                found[index, name] = handle
            seconds += out.seconds
            sent += out.published_bytes
        members: dict[int, list[str]] = {}
        for index, name in found:
            members.setdefault(index, []).append(name)
        n_parts = len(members)
        handles = [self._handle({name: found[index, name] for name in members[index]}) for index in range(n_parts)]
        # a micro-batch is cached when every member of every part read it from a cache
        from_cache = [all(isinstance(found[i, n], CachedOutput) for n in members[i]) for i in range(n_parts)]
        cached = sum(all(parts) for parts in per_batch(job.batches, from_cache))
        return TeacherOutputs(join_handles(job.batches, handles), seconds=seconds, published_bytes=sent,
                              cached=cached)

    @staticmethod
    def _handle(by_member: dict[str, Any]) -> Any:
        return next(iter(by_member.values())) if len(by_member) == 1 else MemberHandles(by_member)

    def recompute(self, batches: list[MicroBatch], handles: list[Any], unserved: set[str]) -> list[Any]:
        """``handles`` with every cached output holding an ``unserved`` key computed again by its
        teacher (loaded for it if needed)."""
        parts, out = split_parts(batches, handles)
        for name, dispatch in self.parts.items():
            indices = [i for i, p in enumerate(parts) if name in p.route.members]
            own = [_member_handle(out[i], name) for i in indices]
            if not any(isinstance(h, CachedOutput) and unserved & set(h.keys) for h in own):
                continue
            if self.teachers.take_turns:
                dispatch.group = self.teachers.turn(name)
            views = [parts[i].route.view(parts[i], name) for i in indices]
            for i, handle in zip(indices, dispatch.recompute(views, own, unserved), strict=True):
                out[i] = handle if not isinstance(out[i], MemberHandles) else \
                    MemberHandles({**out[i].handles, name: handle})
        return join_handles(batches, out)

    def outputs(self, batches: list[MicroBatch]) -> list[Any]:
        return self.collect(self.submit(batches)).handles

    def wake(self) -> None:
        for name in self.teachers.loaded:
            self.teachers.groups[name].wake()

    def sleep(self) -> None:
        for name in self.teachers.loaded:
            self.teachers.groups[name].sleep()

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the dispatch: which teacher is resident (take_turns)."""
        return {RESIDENT: self.teachers.resident} if self.teachers.take_turns else {}

    def restore(self, state: dict[str, Any]) -> None:
        """Resume: the teacher that was resident at the checkpoint is resident again."""
        resident = state.get(RESIDENT)
        if self.teachers.take_turns and resident in self.parts:
            self.parts[resident].group = self.teachers.turn(resident)


def _member_handle(handle: Any, name: str) -> Any:
    return handle.handles[name] if isinstance(handle, MemberHandles) else handle
