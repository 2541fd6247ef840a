"""Launchers place workers; worker groups call them.

A launcher (``launcher=local`` or ``launcher=ray``) creates the workers of one role from their
class and one typed spec per worker (:mod:`kdlib.workers.specs`) and returns a :class:`WorkerGroup`.
A group runs a *worker call* on its workers: a function whose first parameter is the worker, either
a worker method (``StudentWorker.train_step``) or a module-level function of a backend that needs
to act inside the worker (a weight broadcast). Passing the function itself, never its name, keeps
every call visible to readers and tools; :mod:`kdlib.workers.groups` wraps the groups in typed
handles, so the controller writes ``students.train_step(shares)``. Whether the workers are
objects in this process or Ray actors is the launcher's business alone: this module and the local
launcher turn a call into a direct call, :mod:`kdlib.launch.ray` into ``.remote`` calls.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Callable, Sequence

from kdlib.config.training import LauncherConfig
from kdlib.registry import Registry

LAUNCHERS: Registry[type["Launcher"]] = Registry("launcher")

# fn(worker, *args, **kwargs): a worker method or a function that acts on a worker.
WorkerCall = Callable[..., Any]


def call_name(fn: WorkerCall) -> str:
    """How a worker call is named in messages (``StudentWorker.train_step``)."""
    return getattr(fn, "__qualname__", repr(fn))


class WorkerGroup(ABC):
    """The workers of one role (teacher, student, rollout)."""

    role: str

    @property
    @abstractmethod
    def size(self) -> int:
        """Number of workers."""

    @abstractmethod
    def call(self, fn: WorkerCall, *args: Any, **kwargs: Any) -> list[Any]:
        """``fn(worker, *args, **kwargs)`` on every worker; results in rank order."""

    @abstractmethod
    def call_each(self, fn: WorkerCall, args_per_worker: Sequence[tuple]) -> list[Any]:
        """``fn(worker_i, *args_per_worker[i])`` (one argument tuple per worker); results in rank order."""

    def submit_each(self, fn: WorkerCall, args_per_worker: Sequence[tuple]) -> list[Any]:
        """Start ``call_each`` and return one future per worker, for :meth:`gather`. Groups whose
        workers live in this process run the calls now (their futures are the results)."""
        return self.call_each(fn, args_per_worker)

    def gather(self, futures: list[Any], fn: WorkerCall) -> list[Any]:
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
