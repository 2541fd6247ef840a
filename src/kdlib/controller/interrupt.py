"""SIGINT (Ctrl-C) and SIGTERM (a scheduler, ``kill``) during training: stop after the step.

Killing a run in the middle of an optimizer step would lose everything since the last checkpoint;
letting the signal tear through a collective or a half-written checkpoint is worse. While the
training loop runs, :class:`StopRequests` turns the first SIGINT or SIGTERM into a request that the
loop honours at its next safe point (the end of the current step or evaluation): it writes a
checkpoint and stops with :class:`~kdlib.errors.Interrupted`, whose message says how to resume. A
second signal gets the handler that was there before (Ctrl-C twice stops at once). Handlers can
only be installed from the main thread; elsewhere (a notebook running kdlib in a thread) signals
keep their usual effect.
"""

from __future__ import annotations

import logging
import signal
import threading
from types import FrameType
from typing import Any, Optional

log = logging.getLogger(__name__)

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    """Context manager: while active, SIGINT/SIGTERM set :attr:`signal_number` instead of stopping."""

    def __init__(self) -> None:
        self.signal_number: Optional[int] = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signal_number is not None

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.signal_number).name if self.signal_number is not None else ""

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signal_number = signum
        self._restore()  # a second signal acts as it would have without kdlib
        log.warning(
            "received %s: finishing the current step, then writing a checkpoint and stopping "
            "(send it again to stop at once, without a checkpoint)", signal.Signals(signum).name,
        )

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
        self._previous.clear()
