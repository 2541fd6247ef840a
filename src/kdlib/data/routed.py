"""The data of a run with several teachers: every sample as each teacher of its route reads it.

:class:`RoutedDataBundle` is a :class:`~kdlib.data.bundle.DataBundle` whose samples carry a
:class:`~kdlib.routing.SampleRoute`. Each teacher has a :class:`TeacherView` (its own rendering
when its tokenizer, template or privileged prompt differs from the student's, the byte-offset
aligner of cross-tokenizer algorithms), made the first time a row routes to it, so a teacher no row
needs loads nothing. A row becomes one sample per member of its route, exactly as a one-teacher run
with that member would make it (:func:`kdlib.data.samples.row_sample`); the student's side is the
same in each, and the row is kept only when every member keeps it. A global batch is planned as a
one-teacher run plans it, and a micro-batch holding samples of several targets keeps each target's
samples together as a part (:class:`~kdlib.routing.MixedRoute`: one student forward, each part
scored by its own teachers and trained with its own loss); with an algorithm that cannot take a
given student forward, global batches are planned per target instead (each micro-batch one
target's). Held-out micro-batches are always per target. A run whose rows all go to one teacher
forms exactly the micro-batches of the one-teacher run with it.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

from kdlib.batch import MicroBatch
from kdlib.config.schema import DataConfig, TrainConfig
from kdlib.data.batching import StepPlan, collate, micro_batches, plan_step
from kdlib.data.bundle import DataBundle
from kdlib.data.encoding import ChatEncoder
from kdlib.data.formats import privileged_conversation
from kdlib.data.routes import Router
from kdlib.data.samples import (
    FilterReport, Prompt, Row, Sample, load_conversations, load_split, rollout_sample, row_sample, without_response,
)
from kdlib.routing import BatchRoute, MixedRoute, SampleRoute

if TYPE_CHECKING:
    from kdlib.data.cross_tokenizer import ResponseAligner


@dataclass
class TeacherView:
    """How one teacher reads the data."""

    # Its own rendering of a conversation; None: it reads exactly the student's tokens.
    encoder: Optional[ChatEncoder]
    # Cross-tokenizer algorithms: aligns the student's and this teacher's tokens.
    aligner: Optional["ResponseAligner"] = None
    # The column of its privileged prompt (None: the student's prompt).
    input_key: Optional[str] = None

    @property
    def pad_id(self) -> Optional[int]:
        return None if self.encoder is None else self.encoder.pad_id


@dataclass
class PromptRoute:
    """On-policy: the route of a prompt and each member's prompt ids (None: the student's)."""

    target: str
    members: tuple[str, ...]
    teacher_ids: dict[str, Optional[list[int]]]
    weights: Optional[tuple[float, ...]]


@dataclass
class RoutedDataBundle(DataBundle):
    """A data bundle whose samples and prompts are routed to named teachers."""

    router: Optional[Router] = None
    # Makes a teacher's view the first time it is needed (name -> view).
    make_view: Optional[Callable[[str], TeacherView]] = None
    # How each ensemble combines its members (ensemble -> Combine value).
    combine: dict[str, str] = field(default_factory=dict)
    # Whether a training micro-batch may hold the samples of several targets (the algorithm
    # computes its loss from a given student forward: Algorithm.shares_forward).
    mix_routes: bool = False
    views: dict[str, TeacherView] = field(default_factory=dict)
    prompt_routes: dict[int, PromptRoute] = field(default_factory=dict)

    def view(self, name: str) -> TeacherView:
        if name not in self.views:
            self.views[name] = self.make_view(name)
        return self.views[name]

    def needed_teachers(self) -> list[str]:
        """The teachers some sample or prompt of this run is routed to, in the router's order."""
        used = {m for s in [*self.train, *self.eval] for m in s.route.members}
        used |= {m for route in self.prompt_routes.values() for m in route.members}
        return [name for name in self.router.teachers if name in used]

    def load_samples(self, cfg: DataConfig, split: str) -> tuple[list[Sample], FilterReport]:
        source = load_split(cfg, split)
        report = FilterReport.of(source)
        samples = []
        for row in load_conversations(source, cfg):
            raw, where = source.rows[row.index], f"{source.key}: {source.where(row.index)}"
            target, weights = self.router.route(raw, where)
            members = self.router.members(target)
            views: dict[str, Sample] = {}
            reason, truncated = "", False
            for member in members:
                sample, reason, cut = row_sample(self._row_for(member, row, raw, where, cfg), where, cfg,
                                                 self.student_encoder, self.view(member).encoder,
                                                 self.view(member).aligner, report)
                if sample is None:
                    break
                views[member] = sample
                truncated = truncated or cut
            if len(views) < len(members):
                report.dropped[reason] += 1
                continue
            report.kept += 1
            report.truncated += int(truncated)
            samples.append(_routed(target, members, views, weights))
        return samples, report

    def _row_for(self, member: str, row: Row, raw: dict, where: str, cfg: DataConfig) -> Row:
        key = self.view(member).input_key
        teacher = privileged_conversation(raw, row.conversation, key, where) if key else None
        return Row(row.index, row.conversation, teacher, row.data)

    def load_prompts(self, cfg: DataConfig) -> tuple[list[Prompt], FilterReport]:
        source = load_split(cfg, "train")
        report = FilterReport.of(source)
        prompts = []
        for row in load_conversations(source, cfg):
            raw, where = source.rows[row.index], f"{source.key}: {source.where(row.index)}"
            target, weights = self.router.route(raw, where)
            members = self.router.members(target)
            prompt = without_response(row.conversation)
            ids = self.student_encoder.encode_prompt(prompt, where)
            teacher_ids: dict[str, Optional[list[int]]] = {}
            for member in members:
                encoder = self.view(member).encoder
                own = self._row_for(member, row, raw, where, cfg)
                teacher_ids[member] = None if encoder is None else encoder.encode_prompt(
                    without_response(own.teacher_conversation or own.conversation), where)
            if max(len(ids), *(len(t or []) for t in teacher_ids.values())) >= cfg.max_len:
                report.dropped[f"prompt longer than data.max_len={cfg.max_len}"] += 1
                continue
            report.kept += 1
            self.prompt_routes[row.index] = PromptRoute(target, members, teacher_ids, weights)
            prompts.append(Prompt(row.index, ids, teacher_ids[members[0]], prompt, row.data))
        return prompts, report

    def rollout_sample(self, prompt: Prompt, response_ids: list[int], max_len: int) -> tuple[Sample, bool]:
        """The sampled response as each member of the prompt's route reads it; when one member's
        room cuts it shorter, every member gets that shorter response (one student sequence)."""
        route = self.prompt_routes[prompt.index]
        for _ in range(2):
            views, cut = {}, False
            for member in route.members:
                own = Prompt(prompt.index, prompt.student_ids, route.teacher_ids[member], prompt.conversation, prompt.row)
                views[member], member_cut = rollout_sample(own, response_ids, max_len, encoder=self.student_encoder,
                                                           aligner=self.view(member).aligner)
                cut = cut or member_cut
            shortest = min(v.student.n_loss_tokens for v in views.values())
            if all(v.student.n_loss_tokens == shortest for v in views.values()):
                break
            response_ids = response_ids[:shortest]
        return _routed(route.target, route.members, views, route.weights), cut

    def collate(self, samples: list[Sample], *, packing: bool = False, training: bool = True) -> MicroBatch:
        """A micro-batch of samples of one route: its first teacher's view, each other member's
        view of the same samples, and their weights."""
        route = samples[0].route
        if any(s.route.target != route.target for s in samples):
            raise ValueError(f"a micro-batch mixes the routes {sorted({s.route.target for s in samples})}")
        row_kind = self.row_kind if training else None

        def of(member: str, views: list[Sample]) -> MicroBatch:
            return collate(views, student_pad_id=self.student_pad_id, teacher_pad_id=self.view(member).pad_id,
                           packing=packing, row_kind=row_kind)

        batch = of(route.teacher, samples)
        others = {m: of(m, [s.route.others[m] for s in samples]) for m in route.members[1:]}
        weights = None
        if route.weights is not None:
            weights = torch.tensor([s.route.weights for s in samples], dtype=torch.float64)
        batch.route = BatchRoute(route.target, route.members, others, weights, self.combine.get(route.target, "mixture"))
        return batch

    def mixed_collate(self, samples: list[Sample], *, packing: bool = False) -> MicroBatch:
        """A training micro-batch of samples of any routes: the samples grouped by target (in
        order of first appearance), the student's tokens of all of them, and each group collated
        as a one-target micro-batch (:class:`~kdlib.routing.MixedRoute`). One target: exactly
        :meth:`collate`."""
        groups = by_route(samples)
        if len(groups) == 1:
            return self.collate(samples, packing=packing)
        parts = [self.collate(group, packing=packing) for group in groups.values()]
        ordered = [s for group in groups.values() for s in group]
        student_only = [replace(s, teacher=None, alignment=None, teacher_response_bytes=None, route=None, cacheable=False)
                        for s in ordered]
        batch = collate(student_only, student_pad_id=self.student_pad_id, packing=packing)
        batch.route = MixedRoute(parts)
        return batch

    def step_batches(self, samples: list[Sample], train: TrainConfig, n_workers: int) -> tuple[StepPlan, list[MicroBatch]]:
        """A global batch planned over ``n_workers`` and collated: as a one-teacher run plans it
        when micro-batches may mix routes (``mix_routes``), else per route (:func:`plan_by_route`)."""
        assert isinstance(train.packing, bool), "train.packing=auto is settled by assembly.chat_encoders first"

        def plan(group: list[Sample]) -> StepPlan:
            return plan_step(group, n_workers, micro_batch_size=train.micro_batch_size,
                             max_tokens=train.max_tokens_per_micro_batch, packing=train.packing)

        if self.mix_routes:
            step = plan(samples)
            return step, [self.mixed_collate(chunk, packing=train.packing) for chunk in step.micro_batches]
        step = plan_by_route(samples, plan)
        return step, [self.collate(chunk, packing=train.packing) for chunk in step.micro_batches]

    def eval_batches(self, batch_size: int) -> list[MicroBatch]:
        return [self.collate(chunk, training=False)
                for group in by_route(self.eval).values() for chunk in micro_batches(group, batch_size)]


def _routed(target: str, members: tuple[str, ...], views: dict[str, Sample], weights: Any) -> Sample:
    """The member 0 view carrying the route (and the other members' views)."""
    first = views[members[0]]
    first.route = SampleRoute(target, members, {m: views[m] for m in members[1:]}, weights)
    return first


def by_route(samples: list[Sample]) -> dict[str, list[Sample]]:
    """The samples of each target, in order of first appearance."""
    groups: dict[str, list[Sample]] = {}
    for sample in samples:
        groups.setdefault(sample.route.target, []).append(sample)
    return groups


def plan_by_route(samples: list[Sample], plan: Callable[[list[Sample]], StepPlan]) -> StepPlan:
    """One step's plan with each target's samples planned on their own (``plan`` of a group) and
    the workers' micro-batches put together, then padded with weight-0 copies to equal counts as
    :func:`~kdlib.data.batching.plan_step` pads. One target: exactly ``plan(samples)``."""
    merged = StepPlan(micro_batches=[])
    for group in by_route(samples).values():
        part = plan(group)
        offset = len(merged.micro_batches)
        merged.micro_batches.extend(part.micro_batches)
        for rank, entries in enumerate(part.per_worker):
            if rank == len(merged.per_worker):
                merged.per_worker.append([])
            merged.per_worker[rank].extend((offset + index, 1.0) for index, weight in entries if weight)
    longest = max(len(entries) for entries in merged.per_worker)
    for entries in merged.per_worker:
        source = entries[0][0] if entries else 0
        entries.extend((source, 0.0) for _ in range(longest - len(entries)))
    return merged
