"""Ray object-store transport: teacher outputs as shared-memory numpy arrays, zero-copy on fetch.

The teacher worker puts every tensor of a :class:`~kdlib.teacher_output.TeacherOutput` (hidden
states, row offsets, top-k log-probabilities, alignment tensors: whatever ``to_parts`` yields)
into the object store as numpy arrays (bf16 travels as its uint16 bit pattern, since numpy has no
bfloat16) and returns the object ref; only refs pass through the controller. A student on the same
node gets read-only numpy views of the shared-memory buffers and wraps them as torch tensors
without copying (``torch.from_numpy`` + ``view``). Weight buckets for on-policy sync travel the
same way.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kdlib.teacher_output import TeacherOutput
from kdlib.transport.base import Transport

# numpy has no bfloat16/float16-compatible torch views for these: ship their bit patterns.
_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16}


@dataclass(frozen=True)
class RayHandle:
    """An object ref to ``({name: (array, torch dtype)}, metadata)`` and its size in bytes."""

    ref: Any
    nbytes: int


def _to_arrays(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[Any, torch.dtype]]:
    return {
        name: (t.detach().to("cpu").contiguous().view(_BITS.get(t.dtype, t.dtype)).numpy(), t.dtype)
        for name, t in tensors.items()
    }


def _from_arrays(arrays: dict[str, tuple[Any, torch.dtype]]) -> dict[str, torch.Tensor]:
    with warnings.catch_warnings():  # the shared buffers are read-only; nothing writes to them
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return {name: torch.from_numpy(array).view(dtype) for name, (array, dtype) in arrays.items()}


def _nbytes(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class RayObjectTransport(Transport):
    def publish(self, output: TeacherOutput) -> RayHandle:
        import ray

        tensors, meta = output.to_parts()
        nbytes = _nbytes(tensors)
        with self._timed(nbytes):
            return RayHandle(ref=ray.put((_to_arrays(tensors), meta)), nbytes=nbytes)

    def fetch(self, handle: RayHandle) -> TeacherOutput:
        import ray

        if not isinstance(handle, RayHandle):
            raise TypeError(
                f"the Ray transport got a {type(handle).__name__} handle; teacher and student must "
                "use the same transport"
            )
        with self._timed(handle.nbytes):
            arrays, meta = ray.get(handle.ref)
            return TeacherOutput.from_parts(_from_arrays(arrays), meta)

    def publish_state(self, state: dict[str, torch.Tensor]) -> RayHandle:
        import ray

        nbytes = _nbytes(state)
        with self._timed(nbytes):
            return RayHandle(ref=ray.put(_to_arrays(state)), nbytes=nbytes)

    def fetch_state(self, handle: RayHandle) -> dict[str, torch.Tensor]:
        import ray

        with self._timed(handle.nbytes):
            return _from_arrays(ray.get(handle.ref))
