"""The buffers a loss evaluation accumulates its gradients into: its own, or shared by a micro-batch's parts.

Every evaluation of the chunked engine (:mod:`kdlib.losses.engine`) computes its gradients in its
forward and keeps them in :class:`GradientBuffers` until autograd asks. A micro-batch holding the
samples of several teachers (``routing.mix_micro_batches``) runs the student's forward once and
then one evaluation per part, on the part's rows. Each on its own would allocate its chunk
workspace and a float32 gradient of the whole student head ([V, H], 113 MB for SmolLM2's), fresh
memory the OS has to fault in (writing 200 MB of it once took ~65 ms on the CPU measured, 9 ms
again: ``benchmarks/call_sizes.py --parts memory``), and autograd would then add
the parts' head gradients together. Inside :func:`sharing` (opened by
:meth:`~kdlib.algorithms.routed.RoutedLoss.part_losses`) the evaluations instead reuse one
workspace and accumulate the head's gradient into one buffer, which the first of them to be
differentiated hands to autograd; the others add nothing. That is exact only when every
evaluation enters the loss with the same weight (the parts' losses are summed, each divided by the
same normaliser); a backward pass that finds otherwise stops with an error instead of training on
a wrong gradient. The hidden states' and a term's own parameters' gradients stay per evaluation.
"""

from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

from kdlib.losses.chunk_math import Workspace, accumulation_dtype

_ACTIVE: ContextVar[Optional["SharedBuffers"]] = ContextVar("kdlib_shared_loss_buffers", default=None)


class SharedGradient:
    """One parameter's gradient buffer, accumulated by every evaluation that joined it."""

    def __init__(self, param: torch.Tensor, dtype: torch.dtype) -> None:
        self.param = param
        self.buffer: Optional[torch.Tensor] = torch.zeros(param.shape, dtype=dtype, device=param.device)
        self.members = 0  # evaluations accumulating into the buffer
        self.arrived = 0  # their backward calls so far (over every backward pass)
        self.scale: Optional[torch.Tensor] = None  # the upstream gradient of this pass's first

    def join(self) -> torch.Tensor:
        """The buffer, for one more evaluation to accumulate into."""
        if self.buffer is None:
            raise RuntimeError("a shared head gradient was already handed to autograd; evaluate before differentiating")
        self.members += 1
        return self.buffer

    def take(self, grad_total: torch.Tensor, keep_graph: bool) -> Optional[torch.Tensor]:
        """The gradient one evaluation's backward returns for the parameter: the whole buffer
        scaled by ``grad_total`` for the first evaluation differentiated in a pass, None (nothing
        to add) for the others, which must have the same ``grad_total``."""
        first = self.arrived % self.members == 0
        self.arrived += 1
        if not first:
            if not _same(grad_total, self.scale):
                raise RuntimeError(
                    "the loss evaluations of one mixed micro-batch share the student head's gradient, so they must "
                    f"enter the loss with the same weight (found {float(grad_total)} and {float(self.scale)}): "
                    "sum the parts' losses, or set routing.mix_micro_batches=false"
                )
            return None
        self.scale = grad_total.detach().clone()
        if self.buffer is None:
            raise RuntimeError("the chunked KD loss was already differentiated without retain_graph")
        if keep_graph:  # another backward may follow: copy
            return (self.buffer * grad_total.to(self.buffer.dtype)).to(self.param.dtype)
        buffer, self.buffer = self.buffer, None  # last use: autograd adopts it as .grad
        return buffer.mul_(grad_total.to(buffer.dtype)).to(self.param.dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal upstream gradients; NaN equals NaN (a non-finite loss is the bad-step check's to
    skip, not an error here)."""
    return torch.equal(a, b) or bool(torch.isnan(a).all() and torch.isnan(b).all())


class SharedBuffers:
    """The chunk workspace and the head parameters' gradients of the evaluations inside one
    :func:`sharing` block."""

    def __init__(self) -> None:
        self._workspaces: dict[tuple[torch.dtype, torch.device], Workspace] = {}
        self._gradients: dict[int, SharedGradient] = {}

    def workspace(self, rows: int, dtype: torch.dtype, device: torch.device) -> Workspace:
        """The block's workspace (its buffers grow when a later evaluation's chunks are longer)."""
        key = (dtype, torch.device(device))
        if key not in self._workspaces:
            self._workspaces[key] = Workspace(rows, dtype, device)
        return self._workspaces[key]

    def gradient(self, param: torch.Tensor, dtype: torch.dtype) -> SharedGradient:
        """The shared gradient of ``param``, accumulated in ``dtype`` (the same tensor object in
        every evaluation; the block holds it, so its id is not reused while the block is open)."""
        if id(param) not in self._gradients:
            self._gradients[id(param)] = SharedGradient(param, dtype)
        return self._gradients[id(param)]


@contextmanager
def sharing() -> Iterator[SharedBuffers]:
    """Let the engine evaluations inside share chunk buffers and the head's gradient (see the module
    docstring); the gradient reaches the parameters in the backward pass, after the block."""
    shared = SharedBuffers()
    token = _ACTIVE.set(shared)
    try:
        yield shared
    finally:
        _ACTIVE.reset(token)


def active() -> Optional[SharedBuffers]:
    """The open :func:`sharing` block's buffers, if any (read by the loss engine)."""
    return _ACTIVE.get()


class GradientBuffers:
    """One evaluation's gradient buffers: the hidden states' in their dtype, each parameter's in
    the accumulation dtype (float32, float64 for float64 heads), cast to the parameter's dtype at
    the end. With ``sharing`` (an open :func:`sharing` block) the head's weight and bias accumulate into
    the block's buffers instead (``self.shared``: their positions among the inputs' gradients,
    hidden first), which the engine's backward hands over once."""

    def __init__(self, hidden: torch.Tensor, params: tuple, needs: tuple[bool, ...],
                 sharing: Optional[SharedBuffers] = None) -> None:
        self.needs = needs
        self.sharing = sharing  # the open block, whose workspace the chunk loop uses too
        self.shared: dict[int, SharedGradient] = {}
        dtype = accumulation_dtype(params[0])
        self.hidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if needs[0] else None
        self.params: list[Optional[torch.Tensor]] = []
        for index, (p, n) in enumerate(zip(params, needs[1:])):
            if p is None or not n:
                self.params.append(None)
            elif sharing is not None and index < 2:  # the head's weight and bias
                self.shared[1 + index] = sharing.gradient(p, dtype)
                self.params.append(self.shared[1 + index].join())
            else:
                self.params.append(torch.zeros(p.shape, dtype=dtype, device=p.device))

    def result(self, params: tuple) -> list[Optional[torch.Tensor]]:
        """The gradients to return (None where shared: the shared buffer is returned once)."""
        return [self.hidden, *(None if g is None or 1 + i in self.shared else g.to(p.dtype)
                               for i, (g, p) in enumerate(zip(self.params, params)))]
