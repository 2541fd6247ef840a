"""TeacherWorker: one teacher replica, wherever a launcher places it.

A plain class: the local launcher calls it in the controller's process, the Ray launcher wraps it in
an actor; it does not know which. It scores micro-batches with its backend, completes the teacher
output (per-sample row offsets, sample ids, the wire dtype: bf16 by default, never fp16), turns
hidden states into the configured ``teacher.signal`` when the backend does not send that signal
itself (:mod:`kdlib.signals`), checks that the rows match the loss positions and that the values
are sound, publishes it through the transport and returns the handles.
Across tokenizers the micro-batch names the teacher rows its algorithm reads: only those are
published (a teacher cache still stores every loss row, so any method can read it later).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from kdlib.backends import TEACHER_BACKENDS
from kdlib.batch import MicroBatch
from kdlib.config.training import HiddenDtype
from kdlib.errors import ModelError
from kdlib.models.head import LMHead
from kdlib.models.loading import resolve_device
from kdlib.models.weights import distinct_tensors
from kdlib.signals import sample_seed, signal_from_hidden
from kdlib.teacher_output import TeacherOutput
from kdlib.transport import build_transport
from kdlib.workers.specs import TeacherSpec
from kdlib.xtok.groups import SentRows

WIRE_DTYPES = {HiddenDtype.bfloat16: torch.bfloat16, HiddenDtype.float32: torch.float32}


@dataclass
class TeacherResult:
    """What one ``forward`` call returns to the controller (small: handles, not tensors)."""

    handles: list[Any]
    seconds: float  # time the worker spent scoring and publishing
    published_bytes: int
    cached_samples: int = 0  # samples written to the teacher cache
    cached_bytes: int = 0


class TeacherWorker:
    def __init__(self, spec: TeacherSpec) -> None:
        self.spec = spec
        self.rank = spec.rank
        self.device = resolve_device(spec.device)
        self.backend = None
        self.load()
        self.transport = build_transport(spec.transport)
        self.wire_dtype = WIRE_DTYPES[HiddenDtype(spec.transport.dtype)]
        self.signal = spec.teacher.signal
        # draws of samples that have no content key (fresh rollouts): this worker's own stream
        self.generator = torch.Generator().manual_seed(self.signal.seed * 1000 + self.rank)
        self.cache = None
        if spec.cache is not None:
            from kdlib.cache.store import TeacherCache

            self.cache = TeacherCache.open(spec.teacher.cache, spec.cache)

    def lm_head(self) -> LMHead:
        """The teacher head on the CPU, detached (shipped once to every student)."""
        return self.backend.lm_head().detached(device="cpu")

    def score(self, batch: MicroBatch) -> TeacherOutput:
        """The complete teacher output of one micro-batch, in the wire dtype, not yet published."""
        view = batch.teacher_view
        output = self.backend.score(view)
        output.check_rows(view.n_loss_tokens)
        self._check_values(output, batch)
        counts = view.loss_rows_per_sample().to("cpu")
        offsets = torch.zeros(counts.numel() + 1, dtype=torch.long)
        torch.cumsum(counts, 0, out=offsets[1:])
        output.row_offsets = offsets
        if output.signal == "hidden":
            output.hidden = output.hidden.to(self.wire_dtype)
        if batch.sample_ids:
            output.sample_ids = torch.tensor(batch.sample_ids, dtype=torch.long)
        if self.signal.sparse and output.signal == "hidden":
            seeds = None if batch.teacher_keys is None else [sample_seed(self.signal.seed, key) for key in batch.teacher_keys]
            output = signal_from_hidden(output, self.backend.lm_head(), self.signal, wire_dtype=self.wire_dtype,
                                        chunk_size=self.spec.chunk_size, seeds=seeds, generator=self.generator)
            self._check_values(output, batch)
        output.__post_init__()  # offsets and ids are consistent with the rows
        return output

    def _check_values(self, output: TeacherOutput, batch: MicroBatch) -> None:
        """A teacher whose outputs are NaN or inf (or ids outside its vocabulary) stops the run at
        once, naming the teacher: every student update would be skipped, or worse, the loss would
        train on nonsense."""
        problem = output.check_values()
        if problem:
            teacher = self.spec.teacher
            name = "the self-distillation teacher" if teacher.from_student else f"teacher {teacher.model}"
            raise ModelError(
                f"{name} returned {problem} of samples {batch.sample_ids}: its weights or its dtype "
                f"({teacher.dtype.value}) cannot represent this model; check the checkpoint, or try teacher.dtype=float32"
            )

    def forward(self, batches: list[MicroBatch], publish: bool = True) -> TeacherResult:
        """Transport handles of the outputs of each micro-batch, in order (None when not
        ``publish``-ed: a cache fill), and the cost. With a cache, new samples are written to it."""
        start = time.perf_counter()
        handles = []
        for batch in batches:
            output = self.score(batch)
            if self.cache is not None and batch.teacher_keys is not None:
                self.cache.write({key: output.sample_rows(i) for i, key in enumerate(batch.teacher_keys)})
            handles.append(self.transport.publish(rows_to_send(output, batch)) if publish else None)
        published = self.transport.stats.take()
        written = self.cache.stats.take() if self.cache is not None else None
        return TeacherResult(
            handles, time.perf_counter() - start, published.bytes,
            cached_samples=written.written if written else 0, cached_bytes=written.bytes_written if written else 0,
        )

    def load_weights(self, handles: list[Any], ema_decay: Optional[float] = None) -> None:
        """Self-distillation: take the student's weights (copied, or averaged in with ``ema_decay``)."""
        for handle in handles:
            self.backend.load_weights(self.transport.fetch_state(handle), ema_decay=ema_decay)

    def save_weights(self, path: Optional[str]) -> None:
        """Self-distillation checkpoint: write the teacher's current weights to ``path`` (one rank
        gets a path; the others, holding the same weights, get None)."""
        if path is None:
            return
        from safetensors.torch import save_file

        from kdlib.parallel.checkpoint import storage_errors

        with storage_errors(Path(path).parent):
            save_file(distinct_tensors(self.backend.weights()), path)

    def load_saved_weights(self, path: str) -> None:
        """Resume: take exactly the weights :meth:`save_weights` wrote."""
        from safetensors.torch import load_file

        self.backend.load_weights(load_file(path), ema_decay=None)

    def load(self) -> None:
        """Load the model (at start, and when several teachers take turns and this one's turn comes)."""
        if self.backend is None:
            spec = self.spec
            self.backend = TEACHER_BACKENDS.get(spec.teacher.backend.name)(spec.teacher, self.device, spec.architecture)

    def unload(self) -> None:
        """Free the model entirely (several teachers taking turns: another one's turn comes)."""
        self.backend = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        return_freed_heap()

    def sleep(self) -> None:
        """Colocation: release the accelerator while the students train (an unloaded teacher holds none)."""
        if self.backend is not None:
            self.backend.sleep()

    def wake(self) -> None:
        if self.backend is not None:
            self.backend.wake()


def return_freed_heap() -> bool:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``): a model's many small
    weight tensors live on the heap, and glibc keeps their pages after they are freed, so an
    unloaded teacher would still count in the process's memory and the next teacher's load would
    come on top. False where the C library has no ``malloc_trim`` (not glibc)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        trim = ctypes.CDLL(name).malloc_trim if name else None
    except (OSError, AttributeError):
        trim = None
    if trim is None:
        return False
    trim(0)
    return True


def rows_to_send(output: TeacherOutput, batch: MicroBatch) -> TeacherOutput:
    """The rows of ``output`` the micro-batch's algorithm reads (``batch.teacher_rows``, with
    per-sample offsets of the rows kept and the rows themselves in the ``alignment`` field), or
    ``output`` unchanged when it reads every loss row (identical tokenizers, all groups 1:1)."""
    rows = batch.teacher_rows
    if rows is None or rows.numel() == output.n_rows:  # (sorted, distinct: then every row, in order)
        return output
    return TeacherOutput(
        row_offsets=batch.alignment.sent_row_offsets(rows.cpu()),
        sample_ids=output.sample_ids,
        alignment=SentRows(teacher_rows=rows.cpu()),
        **output.select_rows(rows.to(output.device)),
    )
