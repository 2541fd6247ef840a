"""The Ray launcher: every worker is a Ray actor; Ray is started (or joined) per run.

Each actor wraps one plain worker object (``TeacherWorker``, ``StudentWorker``, ...), constructed
inside the actor; a group call sends the worker call (a function of the worker, pickled by
reference) and its arguments, and returns the results in rank order. Student groups are
data-parallel: rank 0's actor picks ``MASTER_ADDR``/``MASTER_PORT`` before any worker is built, so
the workers can form their torch.distributed group.

Each role's workers are reserved as one placement group with the role's resources
(``launcher.teacher``, ``launcher.teachers.<name>`` for named teachers, ``launcher.student``,
``launcher.rollout``; see :mod:`kdlib.launch.placement`), which is how teacher engines, rollout engines and students are
laid out across the nodes of a cluster (``launcher.address``).

Results are gathered fail-fast: the first worker that raises or dies stops the call with a
:class:`~kdlib.errors.WorkerError` naming the role, rank, process and node (and whether the node
itself stopped), instead of leaving the other ranks waiting in a collective (a served teacher that
fails keeps its own error, TeacherUnavailable, so the run checkpoints as it does locally). Ray is shut down with
the launcher (also after a failure), so a sweep starts each job with a fresh cluster unless
``launcher.address`` joins a running one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from kdlib.config.training import LauncherConfig
from kdlib.errors import ConfigError, TeacherUnavailable, WorkerError
from kdlib.launch.base import Launcher, WorkerCall, WorkerGroup, call_name
from kdlib.launch.placement import (
    ROLE_ORDER,
    RolePlacement,
    check_colocation,
    combined,
    node_alive,
    node_names,
    reserve,
    worker_bundle,
)

log = logging.getLogger(__name__)

NAMED_TEACHER = "teachers."  # the role of a named teacher's group is teachers.<name>


@dataclass
class RayLauncherConfig(LauncherConfig):
    name: str = "ray"
    # Address of a running cluster ("auto", "ray://host:10001"); null starts a local one.
    address: Optional[str] = None
    # CPUs / GPUs of a local cluster (null: everything the machine has).
    num_cpus: Optional[int] = None
    num_gpus: Optional[int] = None
    # Resources each worker asks for; fractional CPUs let several workers share few cores.
    cpus_per_worker: float = 0.5
    # GPUs per worker (null: 1 when the cluster has GPUs, else 0).
    gpus_per_worker: Optional[float] = None
    # torch threads per worker process (null: max(1, cpus_per_worker)).
    threads_per_worker: Optional[int] = None
    # Seconds a collective may wait before a student rank gives up (a dead peer).
    collective_timeout_s: float = 300.0
    # Placement of each role's workers: resources per worker, packing strategy.
    teacher: RolePlacement = field(default_factory=RolePlacement)
    student: RolePlacement = field(default_factory=RolePlacement)
    rollout: RolePlacement = field(default_factory=RolePlacement)
    # Placement of each named teacher's workers (`teachers.<name>`), by name; a teacher not listed
    # is placed as `teacher`. Named teachers have bundles of their own (no colocate_with).
    teachers: dict[str, RolePlacement] = field(default_factory=dict)
    # Seconds to wait for a role's resources before failing with what is missing.
    placement_timeout_s: float = 120.0

    def check(self) -> None:
        check_colocation({role: getattr(self, role) for role in ROLE_ORDER})
        for name, placement in self.teachers.items():
            if placement.colocate_with is not None:
                raise ValueError(f"teachers.{name}.colocate_with: a named teacher's workers have bundles of their own")


def _actor_class():
    import ray

    @ray.remote(max_restarts=0)
    class WorkerActor:
        """Hosts one plain worker object in its own process."""

        def __init__(self, env: dict[str, str], threads: int) -> None:
            os.environ.update(env)
            import torch

            torch.set_num_threads(threads)
            self.worker = None

        def address(self) -> tuple[str, int, int]:
            from kdlib.parallel.distributed import free_port, node_address

            return node_address(), free_port(), os.getpid()

        def build(self, worker_cls: type, spec: Any, env: dict[str, str]) -> tuple[int, str]:
            """Construct the worker; its process id and Ray node id."""
            os.environ.update(env)
            self.worker = worker_cls(spec)
            return os.getpid(), ray.get_runtime_context().get_node_id()

        def call(self, fn: Any, args: tuple, kwargs: dict) -> Any:
            return fn(self.worker, *args, **kwargs)

        def call_packed(self, fn: Any, packed: tuple) -> Any:
            args, kwargs = packed  # Ray resolved the shared object ref to its value
            return fn(self.worker, *args, **kwargs)

    return WorkerActor


class RayWorkerGroup(WorkerGroup):
    def __init__(self, role: str, actors: list, pids: list[int]) -> None:
        self.role = role
        self.actors = actors
        self.pids = pids
        self.node_ids: list[str] = ["?"] * len(actors)
        self.nodes: list[str] = ["?"] * len(actors)  # readable node names, for messages

    @property
    def size(self) -> int:
        return len(self.actors)

    def call(self, fn: WorkerCall, *args: Any, **kwargs: Any) -> list[Any]:
        import ray

        packed = ray.put((args, kwargs))  # serialised once, however many workers read it
        return self.gather([a.call_packed.remote(fn, packed) for a in self.actors], fn)

    def call_each(self, fn: WorkerCall, args_per_worker: Sequence[tuple]) -> list[Any]:
        return self.gather(self.submit_each(fn, args_per_worker), fn)

    def submit_each(self, fn: WorkerCall, args_per_worker: Sequence[tuple]) -> list:
        """Start the calls and return their futures (Ray object refs) without waiting."""
        return [a.call.remote(fn, tuple(args), {}) for a, args in zip(self.actors, args_per_worker, strict=True)]

    def gather(self, refs: list, fn: WorkerCall | str = "call") -> list[Any]:
        """Results of ``refs`` in order; the first failure raises WorkerError at once."""
        import ray

        method = fn if isinstance(fn, str) else call_name(fn)
        index = {ref: rank for rank, ref in enumerate(refs)}
        pending = list(refs)
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            for ref in ready:
                try:
                    ray.get(ref)
                except Exception as exc:  # noqa: BLE001 - translated into one named error
                    rank, exc = self._root_failure((index[ref], exc), pending, index)
                    raise self._error(rank, method, exc) from exc
        return ray.get(refs)

    def _root_failure(self, first: tuple[int, BaseException], pending: list,
                      index: dict) -> tuple[int, BaseException]:
        """The failure to report: a worker that died rather than a survivor whose collective
        broke because of it. When one rank is killed, the others' gloo/NCCL calls often fail
        first ("connection reset by peer") while the dead actor's error is still in flight, so
        the other calls get :data:`DEATH_GRACE_S` to come back before the first failure is named."""
        import ray

        if _actor_died(first[1]) or not pending:
            return first
        done, _ = ray.wait(pending, num_returns=len(pending), timeout=DEATH_GRACE_S)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - reported by the caller when its rank died
                if _actor_died(exc):
                    return index[ref], exc
        return first

    def _error(self, rank: int, method: str, exc: BaseException) -> WorkerError | TeacherUnavailable:
        cause = _cause(exc)
        if isinstance(cause, TeacherUnavailable):  # a served teacher failed, not the worker: the
            # students are intact and the run stops as it does locally (a checkpoint, one line)
            return TeacherUnavailable(f"{self.role} worker {rank}: {cause}")
        where = f"node {self.nodes[rank]}"
        if _node_stopped(self.node_ids[rank], exc):
            reason = f"its {where} stopped (the node left the cluster)"
        else:
            reason = f"{_describe(exc)}; it ran on {where}"
        return WorkerError(f"{self.role} worker {rank} (pid {self.pids[rank]}) failed in {method}(): {reason}")


class RayLauncher(Launcher):
    cfg: RayLauncherConfig

    def __init__(self, cfg: RayLauncherConfig) -> None:
        super().__init__(cfg)
        import ray

        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        self._started = False
        self._actors: list = []
        self._placement_groups: list = []
        self._bundles: dict[str, tuple[Any, int]] = {}  # role -> (its placement group, bundles)
        if not ray.is_initialized():
            ray.init(
                address=cfg.address,
                num_cpus=cfg.num_cpus if cfg.address is None else None,
                num_gpus=cfg.num_gpus if cfg.address is None else None,
                include_dashboard=False,
                log_to_driver=True,
                configure_logging=False,
            )
            self._started = True
        self.has_gpus = ray.cluster_resources().get("GPU", 0) > 0

    def group(self, role: str, worker_cls: type, specs: Sequence[Any], *, distributed: bool = False) -> WorkerGroup:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cfg = self.cfg
        placement = self._placement(role)
        cpus, gpus = self._cpus_gpus(role)
        threads = cfg.threads_per_worker or max(1, int(cpus))
        base_env = {"TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(threads)}
        reserved = self._reserve(role, len(specs))
        actors = [
            _actor_class().options(
                num_cpus=cpus, num_gpus=gpus, resources=dict(placement.resources) or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(reserved, placement_group_bundle_index=rank),
            ).remote(base_env, threads)
            for rank in range(len(specs))
        ]
        self._actors.extend(actors)
        group = RayWorkerGroup(role, actors, [-1] * len(actors))
        env: dict[str, str] = {}
        if distributed and len(actors) > 1:
            host, port, _ = group.gather([actors[0].address.remote()], "address")[0]
            env = {"MASTER_ADDR": host, "MASTER_PORT": str(port),
                   "KDLIB_COLLECTIVE_TIMEOUT_S": str(cfg.collective_timeout_s)}
        refs = [a.build.remote(worker_cls, spec, env) for a, spec in zip(actors, specs)]
        built = group.gather(refs, "__init__")
        names = node_names()
        group.pids = [int(pid) for pid, _ in built]
        group.node_ids = [node for _, node in built]
        group.nodes = [names.get(node, node) for node in group.node_ids]
        log.info("%s group: %d Ray actor(s), pids %s, nodes %s", role, len(actors), group.pids, group.nodes)
        return group

    def _placement(self, role: str) -> RolePlacement:
        if role.startswith(NAMED_TEACHER):  # a named teacher's group: its own placement, else the teacher's
            return self.cfg.teachers.get(role[len(NAMED_TEACHER):]) or self.cfg.teacher
        return getattr(self.cfg, role, None) or RolePlacement()

    def _cpus_gpus(self, role: str) -> tuple[float, float]:
        """What one worker of ``role`` asks for (role option, else the launcher's, else 1 GPU
        when the cluster has GPUs)."""
        placement, cfg = self._placement(role), self.cfg
        cpus = placement.cpus_per_worker if placement.cpus_per_worker is not None else cfg.cpus_per_worker
        gpus = next((g for g in (placement.gpus_per_worker, cfg.gpus_per_worker) if g is not None),
                    1.0 if self.has_gpus else 0.0)
        return cpus, gpus

    def _reserve(self, role: str, n_workers: int) -> Any:
        """The placement group ``role``'s workers run in: its own (reserving room for the roles
        that colocate with it too), or the bundles of the role it colocates with."""
        placement = self._placement(role)
        host = placement.colocate_with
        if host is not None:
            if host not in self._bundles:
                raise ConfigError(f"launcher.{role}.colocate_with={host}: this run starts no {host} workers before the {role}")
            group, n_host = self._bundles[host]
            if n_workers > n_host:
                raise ConfigError(f"launcher.{role}.colocate_with={host}: {n_workers} {role} workers for {n_host} {host} bundles")
            return group
        guests = [r for r in ROLE_ORDER if r != role and self._placement(r).colocate_with == role]
        bundle = combined(*(worker_bundle(self._placement(r), *self._cpus_gpus(r)) for r in [role, *guests]))
        group = reserve(role, placement.strategy, n_workers, bundle, self.cfg.placement_timeout_s)
        self._placement_groups.append(group)
        self._bundles[role] = (group, n_workers)
        return group

    def shutdown(self) -> None:
        import ray

        from ray.util.placement_group import remove_placement_group

        for actor in self._actors:
            with contextlib.suppress(Exception):  # already dead
                ray.kill(actor)
        self._actors.clear()
        for reserved in self._placement_groups:
            with contextlib.suppress(Exception):  # its node is gone
                remove_placement_group(reserved)
        self._placement_groups.clear()
        self._bundles.clear()
        if self._started and ray.is_initialized():
            ray.shutdown()
            self._started = False


def _cause(exc: BaseException) -> BaseException:
    import ray

    if isinstance(exc, ray.exceptions.RayTaskError) and exc.cause is not None:
        return exc.cause
    return exc


def _actor_died(exc: BaseException) -> bool:
    """Whether a Ray call failed because its actor died (or became unreachable), not by raising."""
    import ray

    return isinstance(_cause(exc), ray.exceptions.RayActorError)


def _describe(exc: BaseException) -> str:
    """One line for a Ray task error: the worker's own exception, or how the actor died."""
    import ray

    cause = _cause(exc)
    if isinstance(cause, ray.exceptions.ActorUnavailableError):
        return "the worker became unreachable"
    if _actor_died(exc):
        return "the worker process died (killed, out of memory, or crashed)"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"


# How long the other ranks' calls may take to come back after one failed, so that a rank that
# died is named instead of a survivor whose collective broke because of it (an error path only).
DEATH_GRACE_S = 5.0

# A worker that became unreachable may be on a node that stopped; Ray's GCS declares a node dead
# after its health checks fail (about 15 s with Ray's defaults), so wait that long to tell.
NODE_DEATH_WAIT_S = 30.0


def _node_stopped(node_id: str, exc: BaseException) -> bool:
    import ray

    if node_id == "?" or not _actor_died(exc):
        return False  # the worker raised: its node is fine
    unreachable = isinstance(_cause(exc), ray.exceptions.ActorUnavailableError)
    deadline = time.monotonic() + (NODE_DEATH_WAIT_S if unreachable else 0)
    while node_alive(node_id):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.5)
    return True
