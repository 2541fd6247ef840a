"""TeacherWorker: one teacher replica, wherever a launcher places it.

A plain class: the local launcher calls it in the controller's process, the Ray launcher wraps it in
an actor; it does not know which. It scores micro-batches with its backend, casts the hidden states
to the wire dtype (bf16 by default, never fp16), publishes them through the transport and returns
the handles.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Optional

import torch

from kdlib.batch import MicroBatch, TeacherOutput
from kdlib.config.schema import HiddenDtype, ModelConfig, TeacherConfig, TransportConfig
from kdlib.models.head import LMHead
from kdlib.models.loading import resolve_device
from kdlib.teacher import TEACHER_BACKENDS
from kdlib.transport import build_transport

WIRE_DTYPES = {HiddenDtype.bfloat16: torch.bfloat16, HiddenDtype.float32: torch.float32}


@dataclass
class TeacherResult:
    """What one ``forward`` call returns to the controller (small: handles, not tensors)."""

    handles: list[Any]
    seconds: float  # time the worker spent scoring and publishing
    published_bytes: int


class TeacherWorker:
    def __init__(
        self, cfg: TeacherConfig, transport: TransportConfig, device: str, rank: int = 0,
        architecture: Optional[ModelConfig] = None,
    ) -> None:
        self.rank = rank
        self.device = resolve_device(device)
        self.backend = TEACHER_BACKENDS.get(cfg.backend)(cfg, self.device, architecture)
        self.transport = build_transport(transport)
        self.wire_dtype = WIRE_DTYPES[HiddenDtype(transport.dtype)]

    def lm_head(self) -> LMHead:
        """The teacher head on the CPU, detached (shipped once to every student)."""
        return self.backend.lm_head().detached(device="cpu")

    def forward(self, batches: list[MicroBatch]) -> TeacherResult:
        """Transport handles of the hidden states of each micro-batch, in order, and the cost."""
        handles = []
        start = time.perf_counter()
        for batch in batches:
            hidden = self.backend.hidden_states(batch.teacher_view)
            expected = batch.teacher_view.n_loss_tokens
            if hidden.shape[0] != expected:
                raise RuntimeError(
                    f"teacher backend returned {hidden.shape[0]} hidden states for {expected} loss tokens"
                )
            handles.append(self.transport.publish(TeacherOutput(hidden.to(self.wire_dtype))))
        published = self.transport.stats.take()
        return TeacherResult(handles, time.perf_counter() - start, published.bytes)

    def load_weights(self, handles: list[Any], ema_decay: Optional[float] = None) -> None:
        """Self-distillation: take the student's weights (copied, or averaged in with ``ema_decay``)."""
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle), ema_decay=ema_decay)

    def sleep(self) -> None:
        """Colocation: release the accelerator while the students train."""
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()

