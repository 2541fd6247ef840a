"""In-process transport: teacher and student share a process, so the output object is the handle.

Nothing is copied; the byte count still reports what a remote transport would have to move.
"""

from __future__ import annotations

import torch

from kdlib.teacher_output import TeacherOutput
from kdlib.transport.base import Transport


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
