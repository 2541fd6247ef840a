"""Progress a person can follow, for every phase of a run that can take more than a few seconds.

One helper instead of a tqdm set-up at every call site. On a terminal it draws a tqdm bar (and
routes console log lines through ``tqdm.write`` so they do not tear the bar). Anywhere else (CI,
``nohup``, a redirected log) a bar is noise, so it writes a log line every ``interval`` seconds
(20 s by default, ``KDLIB_PROGRESS_SECONDS`` overrides) with done/total, rate and time left, and
one line when the phase ends; these lines go to ``kdlib.log`` like every other record. Phases
without a count (loading models, writing a checkpoint) show the time spent so far, so a slow phase
is never silent. ``logging.progress=false`` turns bars and periodic lines off: ``kdlib.run``
applies it (:func:`configured`) to every phase of the run that does not say otherwise.

    with progress("evaluating", total=len(batches), unit="batch", enabled=cfg.logging.progress) as bar:
        for batch in batches:
            ...
            bar.update(1)

    with phase("loading the teacher"):  # enabled: the run's logging.progress
        build_the_teacher()
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from contextlib import contextmanager
from typing import Any, Iterator, Optional

log = logging.getLogger("kdlib.progress")

DEFAULT_INTERVAL_SECONDS = 20.0
INTERVAL_ENV = "KDLIB_PROGRESS_SECONDS"

_active_bars = 0  # terminal bars open now (console logging is redirected while any is)
_active_lock = threading.Lock()
_enabled = True  # the run's logging.progress, for phases that do not pass `enabled`


def interval_seconds() -> float:
    """Seconds between two progress lines when stderr is not a terminal."""
    value = os.environ.get(INTERVAL_ENV)
    try:
        return max(float(value), 0.05) if value else DEFAULT_INTERVAL_SECONDS
    except ValueError:
        return DEFAULT_INTERVAL_SECONDS


@contextmanager
def configured(enabled: bool) -> Iterator[None]:
    """Within the block, progress is shown (or not) by default, as ``logging.progress`` says."""
    global _enabled
    previous, _enabled = _enabled, enabled
    try:
        yield
    finally:
        _enabled = previous


def on_terminal() -> bool:
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


class Progress:
    """Progress of one phase: ``update(n)`` as work completes, ``set_postfix(**values)`` for a
    few live numbers (shown on the bar and in the periodic lines). Use it as a context manager."""

    def __init__(
        self,
        desc: str,
        *,
        total: Optional[int] = None,
        unit: str = "it",
        initial: int = 0,
        enabled: Optional[bool] = None,
        terminal: Optional[bool] = None,
        interval: Optional[float] = None,
        summary: bool = True,
        bar_format: Optional[str] = None,
    ) -> None:
        self.desc = desc
        self.total = total
        self.unit = unit
        self.done = initial
        self.enabled = _enabled if enabled is None else enabled
        self.terminal = on_terminal() if terminal is None else terminal
        self.interval = interval_seconds() if interval is None else interval
        self.postfix: dict[str, Any] = {}
        self.summary = summary
        self._bar_format = bar_format
        self._initial = initial
        self._start = time.monotonic()
        self._bar = None
        self._stop = threading.Event()
        self._ticker: Optional[threading.Thread] = None
        self._redirect = None
        self._closed = False
        if not self.enabled:
            return
        if self.terminal:
            self._open_bar()
        self._ticker = threading.Thread(target=self._tick, name=f"kdlib-progress-{desc}", daemon=True)
        self._ticker.start()

    # -- reporting --------------------------------------------------------------------------

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = values
        if self._bar is not None:
            self._bar.set_postfix({k: _short(v) for k, v in values.items()}, refresh=False)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self._start

    def status(self, *, final: bool = False) -> str:
        """One line: what, how far, how fast, how long left (or, ``final``, how long it took),
        and the postfix values."""
        elapsed = self.elapsed
        parts = []
        if self.total:
            parts.append(f"{self.done}/{self.total} {self.unit} ({100.0 * self.done / self.total:.0f}%)")
        elif self.done and self.unit != "s":
            parts.append(f"{self.done} {self.unit}")
        parts.append(f"{'took' if final else 'elapsed'} {_duration(elapsed)}")
        progressed = self.done - self._initial
        if progressed > 0 and elapsed > 0 and self.unit != "s":
            per_item = elapsed / progressed
            parts.append(f"{per_item:.2f} s/{self.unit}" if per_item >= 1 else f"{1 / per_item:.2f} {self.unit}/s")
            if self.total and not final:
                parts.append(f"{_duration(per_item * max(self.total - self.done, 0))} left")
        if self.postfix:
            parts.append(", ".join(f"{k}={_short(v)}" for k, v in self.postfix.items()))
        return f"{self.desc}{' done' if final else ''}: " + ", ".join(parts)

    # -- lifetime ---------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
        if self._bar is not None:
            self._bar.close()
            self._close_redirect()
        elif self.enabled and self.summary:
            log.info("%s", self.status(final=True))

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _tick(self) -> None:
        """Background: a status line every interval (no terminal), a bar refresh every second
        (terminal), so that a long single step or a model load still shows time passing."""
        wait = 1.0 if self.terminal else self.interval
        while not self._stop.wait(wait):
            if self._bar is not None:
                self._bar.refresh()
            else:
                log.info("%s", self.status())

    def _open_bar(self) -> None:
        global _active_bars
        from tqdm.auto import tqdm

        with _active_lock:
            nested = _active_bars > 0
            _active_bars += 1
        self._bar = tqdm(total=self.total, initial=self.done, desc=self.desc, unit=self.unit,
                         leave=not nested, dynamic_ncols=True, bar_format=self._bar_format)
        if not nested:
            self._redirect = _redirect_console_logging()
            self._redirect.__enter__()

    def _close_redirect(self) -> None:
        global _active_bars
        with _active_lock:
            _active_bars -= 1
        if self._redirect is not None:
            self._redirect.__exit__(None, None, None)
            self._redirect = None


def progress(
    desc: str, *, total: Optional[int] = None, unit: str = "it", initial: int = 0, enabled: Optional[bool] = None
) -> Progress:
    """A :class:`Progress` for ``total`` units of work (None: count without a total)."""
    return Progress(desc, total=total, unit=unit, initial=initial, enabled=enabled)


@contextmanager
def phase(desc: str, *, enabled: Optional[bool] = None, summary: bool = True) -> Iterator[Progress]:
    """A phase without a count (loading models, writing a checkpoint): the time spent is shown
    while it runs and, with ``summary``, logged when it ends."""
    bar = Progress(desc, total=None, unit="s", enabled=enabled, summary=summary, bar_format="{desc}: {elapsed}")
    try:
        yield bar
    finally:
        bar.close()


def _redirect_console_logging():
    """Console log handlers (Hydra's on the root logger, kdlib's own in plain Python) write
    through ``tqdm.write`` while a bar is on the screen; file handlers are left alone."""
    from tqdm.contrib.logging import _is_console_logging_handler, logging_redirect_tqdm

    loggers = [lg for lg in (logging.getLogger(), logging.getLogger("kdlib"))
               if any(_is_console_logging_handler(h) for h in lg.handlers)]
    return logging_redirect_tqdm(loggers=loggers)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)
