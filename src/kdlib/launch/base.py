"""Launchers place workers; worker groups call them.

A launcher (``launcher=local`` or ``launcher=ray``) creates the workers of one role from their
class and one typed spec per worker (:mod:`kdlib.workers.specs`) and returns a :class:`WorkerGroup`. The controller only talks to
groups: ``call`` runs a method on every worker with the same arguments, ``call_each`` with one
argument tuple per worker, and both return the results in rank order. Whether the workers are
objects in this process or Ray actors is the launcher's business alone.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Sequence

from kdlib.config.schema import LauncherConfig
from kdlib.registry import Registry

LAUNCHERS: Registry[type["Launcher"]] = Registry("launcher")


class WorkerGroup(ABC):
    """The workers of one role (teacher, student, rollout)."""

    role: str

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of workers."""

    @abstractmethod
    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """``worker.method(*args, **kwargs)`` on every worker; results in rank order."""

    @abstractmethod
    def call_each(self, method: str, args_per_worker: Sequence[tuple]) -> list[Any]:
        """``worker_i.method(*args_per_worker[i])``; results in rank order."""

    def check_arity(self, args_per_worker: Sequence[tuple]) -> None:
        """One argument tuple per worker, or a clear error."""
        if len(args_per_worker) != self.size:
            raise ValueError(f"{self.role} group has {self.size} workers, got {len(args_per_worker)} argument tuples")

    def submit_each(self, method: str, args_per_worker: Sequence[tuple]) -> list[Any]:
        """Start ``call_each`` and return one future per worker, for :meth:`gather`. Groups whose
        workers live in this process run the calls now (their futures are the results)."""
        return self.call_each(method, args_per_worker)

    def gather(self, futures: list[Any], method: str = "call") -> list[Any]:
        """The results behind ``submit_each``'s futures, in rank order."""
        return futures


class Launcher(ABC):
    """Creates worker groups and owns their lifetime."""

    def __init__(self, cfg: LauncherConfig) -> None:
        self.cfg = cfg

    @abstractmethod
    def group(self, role: str, worker_cls: type, specs: Sequence[Any], *, distributed: bool = False) -> WorkerGroup:
        """Start one worker ``worker_cls(spec)`` of ``role`` per spec; with ``distributed`` they
        will form a torch.distributed group (MASTER_ADDR/PORT are set)."""

    def shutdown(self) -> None:
        """Release the workers and whatever the launcher started."""

    def __enter__(self) -> "Launcher":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


def build_launcher(cfg: LauncherConfig) -> Launcher:
    return LAUNCHERS.get(cfg.name)(cfg)
