"""The HTTP side of the served backend: one httpx client, retries with backoff, one-line errors.

A request is retried only when trying again can help: the connection failed or timed out, or the
server answered 429 (busy) or 5xx (overloaded, restarting). The wait before retry r is
``backoff_s * 2**r``, or the server's ``Retry-After`` seconds when it sends one (capped at 60).
Any other answer (a 4xx, a body that is not JSON) fails at once. Every failure is a
:class:`~kdlib.errors.TeacherUnavailable` of one line naming the endpoint URL and what happened; the API
key travels only in the ``Authorization`` header and appears in no message (httpx's own messages
do not quote headers, and kdlib logs none).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence, TypeVar

import httpx

from kdlib.backends.served.options import ServedTeacherOptions
from kdlib.errors import TeacherUnavailable, first_line

log = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
MAX_RETRY_AFTER_S = 60.0


class ServedClient:
    """Posts JSON bodies to ``options.endpoint``, ``options.concurrency`` at a time."""

    # How a retry waits (tests record the waits instead of sleeping).
    sleep: Callable[[float], None] = staticmethod(time.sleep)

    def __init__(self, options: ServedTeacherOptions) -> None:
        self.options = options
        self.url = options.endpoint
        headers = {"Content-Type": "application/json"}
        self._key = options.api_key()
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        timeout = httpx.Timeout(options.read_timeout_s, connect=options.connect_timeout_s)
        limits = httpx.Limits(max_connections=options.concurrency, max_keepalive_connections=options.concurrency)
        self._http = httpx.Client(headers=headers, timeout=timeout, limits=limits)
        self._pool = ThreadPoolExecutor(max_workers=options.concurrency, thread_name_prefix="kdlib-served")
        self.retried = 0  # retries so far (a count for tests and logs)

    def map(self, bodies: Sequence[dict[str, Any]], read: Callable[[Any, int], T]) -> list[T]:
        """``read(response_json, i)`` for each body's response, in order; the requests run
        concurrently and the first failure is raised (the others are left to finish)."""
        if len(bodies) == 1:
            return [read(self.post(bodies[0]), 0)]
        futures = [self._pool.submit(lambda i=i: read(self.post(bodies[i]), i)) for i in range(len(bodies))]
        return [future.result() for future in futures]

    def post(self, body: dict[str, Any]) -> Any:
        """The parsed JSON answer to one request, after retries."""
        options = self.options
        for attempt in range(options.retries + 1):
            last = attempt == options.retries
            try:
                response = self._http.post(self.url, content=json.dumps(body, separators=(",", ":")))
            except httpx.TimeoutException as exc:
                problem = f"no answer within the timeout ({type(exc).__name__})"
            except httpx.TransportError as exc:
                problem = f"cannot connect ({first_line(exc)})"
            else:
                if response.status_code == 200:
                    return self._json(response)
                problem = f"HTTP {response.status_code}{_detail(response, self._key)}"
                if response.status_code not in RETRY_STATUS:
                    raise TeacherUnavailable(f"teacher server {self.url}: {problem}")
                if not last:
                    self._wait(attempt, response.headers.get("retry-after"), problem)
                    continue
            if last:
                break
            self._wait(attempt, None, problem)
        tries = options.retries + 1
        raise TeacherUnavailable(f"teacher server {self.url}: {problem} after {tries} attempt{'s' if tries > 1 else ''}")

    def _wait(self, attempt: int, retry_after: str | None, problem: str) -> None:
        delay = self.options.backoff_s * 2**attempt
        if retry_after is not None:
            try:
                delay = min(max(float(retry_after), 0.0), MAX_RETRY_AFTER_S)
            except ValueError:
                pass
        self.retried += 1
        log.warning("teacher server %s: %s; retrying in %.2g s", self.url, problem, delay)
        type(self).sleep(delay)

    def _json(self, response: httpx.Response) -> Any:
        try:
            return response.json()
        except ValueError as exc:
            raise TeacherUnavailable(f"teacher server {self.url}: the answer is not JSON ({first_line(exc)})") from None


def _detail(response: httpx.Response, key: str | None) -> str:
    """The start of an error body (servers put their reason there), on one line, without the key
    (should a server echo the request's headers)."""
    text = response.text if not key else response.text.replace(key, "<api key>")
    text = " ".join(text.split())[:200]
    return f": {text}" if text else ""
