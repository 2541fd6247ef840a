"""The local launcher: every worker is a plain object in the controller's process."""

from __future__ import annotations

from typing import Any, Sequence

from kdlib.launch.base import Launcher, WorkerCall, WorkerGroup


class LocalWorkerGroup(WorkerGroup):
    def __init__(self, role: str, workers: list[Any]) -> None:
        self.role = role
        self.workers = workers

    @property
    def size(self) -> int:
        return len(self.workers)

    def call(self, fn: WorkerCall, *args: Any, **kwargs: Any) -> list[Any]:
        return [fn(worker, *args, **kwargs) for worker in self.workers]

    def call_each(self, fn: WorkerCall, args_per_worker: Sequence[tuple]) -> list[Any]:
        return [fn(worker, *args) for worker, args in zip(self.workers, args_per_worker, strict=True)]


class LocalLauncher(Launcher):
    def group(self, role: str, worker_cls: type, specs: Sequence[Any], *, distributed: bool = False) -> WorkerGroup:
        if len(specs) != 1:
            raise ValueError(
                f"launcher=local runs one {role} worker, {len(specs)} were asked for; "
                f"set {role}.num_workers=1 or use launcher=ray"
            )
        return LocalWorkerGroup(role, [worker_cls(spec) for spec in specs])
