"""The transport contract: how teacher outputs reach the student workers.

A teacher worker ``publish``-es each :class:`~kdlib.teacher_output.TeacherOutput` and gets a handle
back; only handles pass through the controller; the student worker that needs the output
``fetch``-es it. The in-process transport hands the object itself over; the Ray transport puts
every tensor of the carrier into the object store (``TeacherOutput.to_parts``), so fields added
to the carrier travel without the transport knowing them. The same channel carries buckets of model weights for on-policy weight sync
(``publish_state``/``fetch_state``). Every transport counts the bytes and seconds it spends, which
the step metrics report. The in-process transport (teacher and students in one process) is the
trivial one and lives here: the object is its own handle.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from kdlib.teacher_output import TeacherOutput
from kdlib.config.schema import TransportConfig
from kdlib.registry import Registry

TRANSPORTS: Registry[type["Transport"]] = Registry("transport")


@dataclass
class TransportStats:
    """Bytes and seconds spent on one side of a transport since the last ``take``."""

    bytes: int = 0
    seconds: float = 0.0

    def record(self, nbytes: int, seconds: float) -> None:
        self.bytes += nbytes
        self.seconds += seconds

    def take(self) -> "TransportStats":
        """The counts so far, resetting them."""
        out = TransportStats(self.bytes, self.seconds)
        self.bytes, self.seconds = 0, 0.0
        return out


class Transport(ABC):
    """Moves teacher outputs; one instance lives in every teacher and student worker."""

    def __init__(self, cfg: TransportConfig) -> None:
        self.cfg = cfg
        self.stats = TransportStats()

    @abstractmethod
    def publish(self, output: TeacherOutput) -> Any:
        """Make ``output`` available to students; return a small handle to it."""

    @abstractmethod
    def fetch(self, handle: Any) -> TeacherOutput:
        """The output behind ``handle``."""

    @abstractmethod
    def publish_state(self, state: dict[str, torch.Tensor]) -> Any:
        """Make named tensors (a bucket of model weights) available to other workers; a handle."""

    @abstractmethod
    def fetch_state(self, handle: Any) -> dict[str, torch.Tensor]:
        """The named tensors behind ``handle``."""

    @contextmanager
    def _timed(self, nbytes: int) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.stats.record(nbytes, time.perf_counter() - start)


def build_transport(cfg: TransportConfig) -> Transport:
    return TRANSPORTS.get(cfg.name)(cfg)


class InProcessTransport(Transport):
    def publish(self, output: TeacherOutput) -> TeacherOutput:
        with self._timed(output.nbytes):
            return output

    def fetch(self, handle: TeacherOutput) -> TeacherOutput:
        if not isinstance(handle, TeacherOutput):
            raise TypeError(
                f"the in-process transport got a {type(handle).__name__} handle; teacher and "
                "student must use the same transport"
            )
        with self._timed(handle.nbytes):
            return handle

    def publish_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        with self._timed(sum(t.numel() * t.element_size() for t in state.values())):
            return state

    def fetch_state(self, handle: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return handle
