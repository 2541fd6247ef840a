"""Ray object-store transport: hidden states as shared-memory numpy arrays, zero-copy on fetch.

The teacher worker puts each output into the object store as a numpy array (bf16 travels as its
uint16 bit pattern, since numpy has no bfloat16) and returns the object ref; only refs pass through
the controller. A student on the same node gets a read-only numpy view of the shared-memory buffer
and wraps it as a torch tensor without copying (``torch.from_numpy`` + ``view``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch

from kdlib.batch import TeacherOutput
from kdlib.transport.base import Transport

_BITS = {torch.bfloat16: torch.uint16, torch.float16: torch.int16, torch.float32: torch.float32}


@dataclass(frozen=True)
class RayHandle:
    """An object ref to a numpy array and the torch dtype it encodes."""

    ref: Any
    dtype: torch.dtype
    nbytes: int


class RayObjectTransport(Transport):
    def publish(self, output: TeacherOutput) -> RayHandle:
        import ray

        hidden = output.hidden
        with self._timed(output.nbytes):
            array = hidden.detach().to("cpu").view(_BITS[hidden.dtype]).numpy()
            ref = ray.put(array)
        return RayHandle(ref=ref, dtype=hidden.dtype, nbytes=output.nbytes)

    def fetch(self, handle: RayHandle) -> TeacherOutput:
        import ray

        if not isinstance(handle, RayHandle):
            raise TypeError(
                f"the Ray transport got a {type(handle).__name__} handle; teacher and student must "
                "use the same transport"
            )
        with self._timed(handle.nbytes):
            array = ray.get(handle.ref)
            with warnings.catch_warnings():  # the shared buffer is read-only; nothing writes to it
                warnings.filterwarnings("ignore", message=".*not writable.*")
                bits = torch.from_numpy(array)
            return TeacherOutput(bits.view(handle.dtype))

    def publish_state(self, state: dict[str, torch.Tensor]) -> RayHandle:
        import ray

        nbytes = sum(t.numel() * t.element_size() for t in state.values())
        with self._timed(nbytes):
            arrays = {name: (t.detach().to("cpu").contiguous().view(_BITS.get(t.dtype, t.dtype)).numpy(), t.dtype)
                      for name, t in state.items()}
            return RayHandle(ref=ray.put(arrays), dtype=torch.uint8, nbytes=nbytes)

    def fetch_state(self, handle: RayHandle) -> dict[str, torch.Tensor]:
        import ray

        with self._timed(handle.nbytes):
            arrays = ray.get(handle.ref)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*not writable.*")
                return {name: torch.from_numpy(array).view(dtype) for name, (array, dtype) in arrays.items()}
