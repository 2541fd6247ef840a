"""StudentWorker: one data-parallel replica of the student, wherever a launcher places it.

A plain class, like the teacher worker. It owns the student model (wrapped with its algorithm in a
:class:`~kdlib.algorithms.objective.StudentObjective`, sharded with FSDP2 when there are several
workers), the optimizer and the schedule. Per optimizer step it fetches the teacher outputs of its
micro-batches from the transport, accumulates gradients (a micro-batch of weight 0 only keeps the
ranks' collectives in step), clips and steps, and returns additive sums (loss terms, token counts,
timings) that the controller adds up across workers. Every rank must receive the same number of
micro-batches; the controller pads with weight-0 ones.

An update whose loss or gradients are not finite (NaN or inf) is skipped: no optimizer or
scheduler step, gradients dropped; the ranks agree on it (one all-reduce), so the shards of an
FSDP2 student never diverge. The step's result says so and names the samples whose loss was bad.

Whatever the student transforms did to the model (LoRA adapters, frozen parts), the weights leave
the worker through :meth:`StudentWorker.export_state`: the plain transformers names and layout,
adapters merged. The rollout engine, a self-distillation teacher and the saved ``student/`` get
them from there.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import torch
from transformers import set_seed

from kdlib.algorithms import ALGORITHMS
from kdlib.algorithms.objective import StudentObjective
from kdlib.algorithms.routed import RoutedLoss, RoutedSums, TeacherSide
from kdlib.batch import MicroBatch
from kdlib.cache.shards import CachedOutput
from kdlib.config.compose import import_plugins
from kdlib.config.teachers import DEFAULT_TEACHER
from kdlib.evaluation import HeldoutSums
from kdlib.models.head import LMHead, tied_head_keys
from kdlib.models.loading import resolve_device
from kdlib.models.student import build_student
from kdlib.models.vlm import image_layout_for
from kdlib.models.weights import state_buckets
from kdlib.optim import build_optimizer, build_scheduler
from kdlib.parallel import checkpoint as ckpt
from kdlib.parallel.distributed import init_process_group
from kdlib.rollout_agreement import AgreementSums
from kdlib.routing import MemberHandles, PartHandles
from kdlib.teacher_output import TeacherOutput
from kdlib.transport import build_transport
from kdlib.workers.specs import StudentSpec
from kdlib.xtok.vocab import VocabMatch


@dataclass
class StudentShare:
    """One student worker's part of an optimizer step, in the order it trains on them."""

    batches: list[MicroBatch]
    # The teacher output of each micro-batch: a transport or cache handle (None without a teacher).
    teacher: list[Any]
    # 1.0, or 0.0 for a padding micro-batch that only keeps the ranks' collectives in step.
    weights: list[float]


@dataclass
class StepSums:
    """What one worker's optimizer step adds to the step's metrics: sums over its micro-batches
    (the controller adds them over workers and divides by the step's loss tokens)."""

    loss_sum: float
    kd_sum: float
    ce_sum: float
    loss_tokens: int
    tokens: int
    grad_norm: float  # of the whole step (the ranks agree)
    lr: float
    skipped: bool  # the update was not finite and was skipped (the ranks agree)
    bad_sample_ids: list[int]  # samples whose loss was not finite
    student_seconds: float
    fetch_seconds: float
    fetched_bytes: int
    # Teacher-cache keys this worker could not read (missing or damaged): the step did not run on
    # any rank, and the controller recomputes those outputs with the teacher and runs it again.
    unserved: list[str] = field(default_factory=list)
    # Several teachers: (loss, kd) sums of the micro-batches of each route (teacher or ensemble).
    routes: dict[str, tuple[float, float]] = field(default_factory=dict)
    # On-policy: the rollout engine's log-probabilities of the sampled tokens against the trainer's.
    agreement: AgreementSums = field(default_factory=AgreementSums)
    pg_sum: Optional[float] = None  # of the policy-gradient term (kdlib.algorithms.reward), if any


@dataclass
class EvalSums:
    """One worker's held-out sums, or the teacher-cache keys it could not read (then no sums)."""

    sums: HeldoutSums
    unserved: list[str] = field(default_factory=list)
    # Several teachers: each teacher's sums on the held-out samples it scores.
    per_teacher: dict[str, HeldoutSums] = field(default_factory=dict)


class StudentWorker:
    def __init__(self, spec: StudentSpec) -> None:
        import_plugins(spec.plugins)  # in a Ray actor, a user's algorithm or loss registers here too
        self.spec = spec
        self.rank = spec.rank
        self.world_size = spec.world_size
        self.device = resolve_device(spec.device)
        if self.world_size > 1:
            timeout = float(os.environ.get("KDLIB_COLLECTIVE_TIMEOUT_S", 600))
            init_process_group(self.rank, self.world_size, self.device, timeout_s=timeout)
        set_seed(spec.seed)  # identical initial weights on every rank
        self.student = build_student(spec.student, self.device)
        self.model = self.student.model
        # a vision-language student lays out its micro-batches' images with its own processor
        self.images = image_layout_for(spec.student, self.model, name="student")
        self.transport = build_transport(spec.transport)
        self.cache = None
        # Teacher caches by directory (several teachers have one each), opened on first use.
        self.caches: dict[str, Any] = {}
        if spec.teacher_cache:
            from kdlib.cache.store import TeacherCache

            self.cache = TeacherCache.for_reading(spec.teacher_cache)
            self.caches[str(self.cache.root)] = self.cache
        self.objective: Optional[StudentObjective] = None
        self.optimizer = None
        self.scheduler = None
        # State that a backend's worker calls keep in this worker (e.g. a weight-broadcast group).
        self.extensions: dict[str, Any] = {}

    def setup(self, teacher_head: Optional[LMHead], total_steps: int, vocab_match: Optional[VocabMatch] = None,
              teachers: Optional[dict[str, TeacherSide]] = None) -> None:
        """Receive the teacher head (None without a teacher) and, across tokenizers, the matched
        vocabulary, or with several teachers each one's (``teachers``, by name); build algorithm,
        sharding, optimizer."""
        if teacher_head is not None:
            teacher_head = teacher_head.detached(device=self.device)
        vocab_match = None if vocab_match is None else vocab_match.to(self.device)
        spec = self.spec
        routes = None
        if teachers:
            routes = RoutedLoss(spec.algorithm, spec.loss, {n: t.to(self.device) for n, t in teachers.items()}, self.model)
            algorithm = routes.algorithms.get(DEFAULT_TEACHER) or next(iter(routes.algorithms.values()))
        else:
            algorithm = ALGORITHMS.get(spec.algorithm.name)(spec.algorithm, spec.loss, teacher_head)
            algorithm.attach(self.model, vocab_match)
        self.objective = StudentObjective(
            self.model, algorithm, device_type=self.device.type,
            autocast=spec.student.autocast, chunk_size=spec.loss.chunk_size, vocab_match=vocab_match, routes=routes,
            rollout_temperature=spec.rollout_temperature,
        )
        if self.world_size > 1:
            from kdlib.parallel.fsdp import shard_student

            shard_student(self.objective, self.model, spec.student.fsdp, self.world_size, self.device)
        self.optimizer = build_optimizer(
            self.objective, spec.train, lr_by_prefix={"algorithm_modules.": algorithm.modules_lr()},
        )
        self.scheduler = build_scheduler(self.optimizer, spec.train, total_steps)

    def train_step(self, share: StudentShare, normaliser: float) -> StepSums:
        """One optimizer step over this worker's micro-batches (skipped when the loss or the
        gradients are not finite); every term is a sum divided by ``normaliser``, the loss tokens of
        the whole step on every worker."""
        assert self.objective is not None, "setup() must run before train_step()"
        batches, weights = share.batches, share.weights
        start = time.perf_counter()
        teachers, unserved = self._fetch_all(share.teacher)
        if unserved:
            return StepSums(0.0, 0.0, 0.0, 0, 0, 0.0, self.scheduler.get_last_lr()[0], False, [],
                            time.perf_counter() - start, 0.0, 0, unserved=unserved)
        self.objective.train()
        self.optimizer.zero_grad(set_to_none=True)
        kd_sum = ce_sum = loss_sum = pg_sum = 0.0
        n_loss_tokens = n_tokens = 0
        bad_samples: list[int] = []
        routes: dict[str, tuple[float, float]] = {}
        agreement = AgreementSums()
        for batch, teacher, weight in zip(batches, teachers, weights, strict=True):
            loss, kd, ce, pg, sampled, by_target = self.objective(self._inputs(batch), teacher, normaliser, weight)
            loss.backward()
            kd_sum += float(kd)
            ce_sum += float(ce)
            pg_sum += float(pg)
            micro_loss = float(loss.detach()) * normaliser
            loss_sum += micro_loss
            for target, sums in (by_target or {}).items():  # (loss, kd) sums per route
                routes[target] = tuple(a + b for a, b in zip(routes.get(target, (0.0, 0.0)), sums))
            if weight:
                if sampled is not None:
                    agreement = agreement.add(sampled)
                n_loss_tokens += batch.n_loss_tokens
                n_tokens += batch.n_tokens
                if not math.isfinite(micro_loss):
                    bad_samples.extend(batch.sample_ids)
        lr = self.scheduler.get_last_lr()[0]
        grad_norm = self._clip_gradients()
        skipped = not self._all_ranks_agree(math.isfinite(loss_sum) and math.isfinite(grad_norm))
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.optimizer.step()
            self.scheduler.step()
        fetched = self.transport.stats.take()
        return StepSums(
            loss_sum=loss_sum, kd_sum=kd_sum, ce_sum=ce_sum, loss_tokens=n_loss_tokens, tokens=n_tokens,
            grad_norm=grad_norm, lr=lr, skipped=skipped, bad_sample_ids=bad_samples,
            student_seconds=time.perf_counter() - start, fetch_seconds=fetched.seconds, fetched_bytes=fetched.bytes,
            routes=routes, agreement=agreement, pg_sum=pg_sum if self.objective.algorithm.policy_gradient_term else None,
        )

    @torch.no_grad()
    def evaluate(self, share: StudentShare) -> EvalSums:
        """Held-out sums of KL(teacher || student), CE and top-1 agreement (weight-0 batches skipped)."""
        teachers, unserved = self._fetch_all(share.teacher)
        if unserved:
            return EvalSums(HeldoutSums(), unserved)
        self.objective.eval()
        total = HeldoutSums()
        per_teacher: dict[str, HeldoutSums] = {}
        for batch, teacher, weight in zip(share.batches, teachers, share.weights, strict=True):
            sums = self.objective(self._inputs(batch), teacher, 1.0, evaluate=True)
            if not weight:
                continue
            if isinstance(sums, RoutedSums):
                for name, own in sums.per_teacher.items():
                    per_teacher[name] = per_teacher.get(name, HeldoutSums()).add(own)
                sums = sums.total
            total = total.add(sums)
        self.transport.stats.take()
        return EvalSums(total, per_teacher=per_teacher)

    def save(self, path: Optional[str], dtype: Optional[torch.dtype] = None) -> dict[str, str]:
        """Write the student in Hugging Face format to ``path`` (given to one rank; the others pass
        None and only take part in gathering the shards), adapters merged, its floating weights in
        ``dtype`` (None: as they are), and what the transforms add beside it (LoRA:
        ``student_adapter/``); returns {output name: directory written}."""
        state = self._full_state()
        if path is None:
            return {}
        directory = Path(path)
        directory.mkdir(parents=True, exist_ok=True)
        weights = self.student.plain_state(state)
        model = self.student.plain_model()
        for key in tied_head_keys(model):  # gathered, a tied head is a second copy: saved once
            weights.pop(key, None)
        if dtype is not None:
            weights = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
            model.config.dtype = dtype  # what from_pretrained(dtype="auto") loads it as
        with ckpt.storage_errors(directory):
            model.save_pretrained(directory, state_dict=weights)
            outputs = {"student": directory, **self.student.save_extras(state, directory)}
        return {name: str(out) for name, out in outputs.items()}

    def export_state(self) -> dict[str, torch.Tensor]:
        """The student's full weights as every consumer expects them: the plain transformers names
        and layout, LoRA adapters merged into their base weights. Gathered from the shards (every
        rank calls; rank 0 gets the weights, the others an empty dict)."""
        state = self._full_state()
        return self.student.plain_state(state) if self.rank == 0 else {}

    def export_weights(self, bucket_bytes: int) -> list[Any]:
        """:meth:`export_state` in transport buckets, for the rollout engine or a self-distillation
        teacher (every rank calls, rank 0 returns the handles)."""
        state = self.export_state()
        return [self.transport.publish_state(bucket) for bucket in state_buckets(state, bucket_bytes)]

    def parameter_stats(self) -> dict[str, float]:
        """This rank's parameter and optimizer-state sizes (shards under FSDP2: add over ranks)."""
        params = list(self.model.parameters())
        optimizer_bytes = sum(
            _local_numel(value) * value.element_size()
            for state in (self.optimizer.state.values() if self.optimizer is not None else [])
            for value in state.values() if isinstance(value, torch.Tensor)
        )
        return {
            "parameters": float(sum(_local_numel(p) for p in params)),
            "trainable_parameters": float(sum(_local_numel(p) for p in params if p.requires_grad)),
            "optimizer_state_bytes": float(optimizer_bytes),
        }

    def set_teacher_head(self, teacher_head: LMHead) -> None:
        """A self-distillation teacher changed: use its new head from now on."""
        self.objective.algorithm.teacher_head = teacher_head.detached(device=self.device)

    def save_checkpoint(self, directory: str, extra: dict[str, Any]) -> None:
        """Sharded model + optimizer, and this rank's scheduler and RNG state (all ranks call)."""
        state = {"scheduler": self.scheduler.state_dict(), "rng": ckpt.rng_state(), **extra}
        ckpt.save_checkpoint(directory, self.objective, self.optimizer, state)

    def load_checkpoint(self, directory: str) -> dict[str, Any]:
        """Restore a checkpoint the controller has verified (its checksums: see checkpoint_files)."""
        extra = ckpt.load_checkpoint(directory, self.objective, self.optimizer, verify=False)
        self.scheduler.load_state_dict(extra.pop("scheduler"))
        ckpt.set_rng_state(extra.pop("rng"))
        return extra

    def sleep(self) -> None:
        """Colocation: move the optimizer state off the accelerator while the teacher runs."""
        _move_optimizer_state(self.optimizer, torch.device("cpu"))
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def wake(self) -> None:
        _move_optimizer_state(self.optimizer, self.device)

    def _full_state(self) -> dict[str, torch.Tensor]:
        """The whole (transformed) model's state dict, gathered from the shards on rank 0 (every
        rank must call; ranks > 0 get an empty dict under FSDP2)."""
        if self.world_size > 1:
            return ckpt.full_model_state(self.objective)
        return {k: v.detach() for k, v in self.model.state_dict().items()}
    def _inputs(self, batch: MicroBatch) -> MicroBatch:
        """``batch`` on this worker's device, its images laid out by the student's processor (a
        sharded student runs its vision tower on every micro-batch: see VisionInputs.idle_pixels)."""
        if self.images is not None:
            batch = replace(batch, student=self.images.attach(batch.student, idle_pixels=self.world_size > 1))
        return batch.to(self.device)

    def _fetch_all(self, handles: list[Any]) -> tuple[list[Optional[TeacherOutput]], list[str]]:
        """The teacher outputs of a share, fetched before any forward pass, and the teacher-cache
        keys that could not be read. The ranks agree on whether any rank has such keys (one
        all-reduce), so that either every rank runs the step or none does (their collectives must
        match); a rank that could read everything then reports nothing."""
        unserved: list[str] = []
        outputs = [self._fetch(handle, unserved) for handle in handles]
        if not self._all_ranks_agree(not unserved):
            return outputs, unserved or [_PEER_UNSERVED]
        return outputs, []

    def _fetch(self, handle: Any, unserved: list[str]) -> Any:
        """One micro-batch's teacher output (an ensemble's: a dict by member; several targets': a
        list by part), or None; unreadable teacher-cache keys are added to ``unserved``."""
        if handle is None:
            return None
        if isinstance(handle, MemberHandles):
            return {name: self._fetch(member, unserved) for name, member in handle.handles.items()}
        if isinstance(handle, PartHandles):
            return [self._fetch(part, unserved) for part in handle.handles]
        if not isinstance(handle, CachedOutput):
            return self.transport.fetch(handle).to(self.device)
        start = time.perf_counter()
        read = self._cache(handle.root).fetch(list(handle.keys), list(handle.sample_ids))
        if read.output is None:
            unserved.extend(read.unserved)
            return None
        self.transport.stats.record(read.output.nbytes, time.perf_counter() - start)
        return read.output.to(self.device)

    def _cache(self, root: Optional[str]) -> Any:
        """The teacher cache at ``root`` (None: the run's teacher.cache), opened for reading once."""
        if root is None:
            return self.cache
        if root not in self.caches:
            from kdlib.cache.store import TeacherCache

            self.caches[root] = TeacherCache.for_reading(root)
        return self.caches[root]

    def _all_ranks_agree(self, ok: bool) -> bool:
        """True when ``ok`` holds on every rank (an update finite everywhere, every teacher output
        read everywhere): the ranks must all step, or all skip."""
        if self.world_size == 1:
            return ok
        import torch.distributed as dist

        flag = torch.tensor([0.0 if ok else 1.0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() == 0.0)

    def _clip_gradients(self) -> float:
        params = [p for p in self.objective.parameters() if p.grad is not None]
        max_norm = self.spec.train.max_grad_norm
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
            norm = norm.full_tensor()
        return float(norm)


# What a rank reports when only another rank could not read its teacher outputs.
_PEER_UNSERVED = "<another rank>"


def _local_numel(tensor: torch.Tensor) -> int:
    """Elements this rank holds (a DTensor's local shard)."""
    local = getattr(tensor, "to_local", None)
    return local().numel() if local is not None else tensor.numel()


def _move_optimizer_state(optimizer: Optional[torch.optim.Optimizer], device: torch.device) -> None:
    if optimizer is None:
        return
    for state in optimizer.state.values():
        for key, value in state.items():
            if isinstance(value, torch.Tensor) and value.device != device:
                state[key] = value.to(device, non_blocking=True)
