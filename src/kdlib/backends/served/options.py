"""The served backend's typed options: where the server is, how to call it, how its answers name tokens.

Selected as ``teacher/backend=served`` (options at ``teacher.backend.*``). The teacher's own
``model`` (or ``tokenizer``) still names a local copy of the teacher's tokenizer and config: kdlib
tokenizes the data with it, sends the ids, and reads the vocabulary size from it; the weights are
never loaded. The API key is never a config value: only the name of the environment variable
holding it is, so neither ``config.yaml`` nor a log line can carry it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from enum import Enum
from typing import Optional
from urllib.parse import urlparse

from kdlib.config.models import TeacherBackendConfig
from kdlib.errors import ModelError


class TokenKeys(str, Enum):
    """How the server's ``top_logprobs`` dictionaries name tokens (they are keyed by strings)."""

    # "token_id:123", asked for with return_tokens_as_token_ids (vLLM): exact for every token.
    ids = "ids"
    # Each token's text decoded alone, a byte fragment of a multi-byte character rendered one
    # latin-1 character per byte (the convention of servers without token-id keys); mapped back
    # through the teacher's tokenizer. A text that several ids share cannot be mapped: such tokens
    # are left out of the top-k (their probability counts in the tail), see extra_logprobs.
    text = "text"


@dataclass
class ServedTeacherOptions(TeacherBackendConfig):
    """teacher/backend=served: a teacher behind an OpenAI-compatible ``/v1/completions`` server."""

    name: str = "served"
    # Base URL of the server, up to (not including) /v1: http://host:30000.
    url: str = "http://127.0.0.1:30000"
    # The model name the server serves (the request's "model" field).
    model: str = "default"
    # How top_logprobs name tokens: ids (vLLM, return_tokens_as_token_ids) | text (see TokenKeys).
    token_keys: TokenKeys = TokenKeys.ids
    # With token_keys=text: ask for this many tokens more than teacher.signal.k per position, to
    # replace those whose text names several ids (left out of the top-k).
    extra_logprobs: int = 16
    # Sequences per request (a micro-batch is split into requests of at most this many prompts).
    batch_size: int = 8
    # Requests in flight at once (a thread pool of this many workers).
    concurrency: int = 4
    # Seconds to wait for a connection.
    connect_timeout_s: float = 10.0
    # Seconds to wait for a response once the request is sent (a long prompt's prefill).
    read_timeout_s: float = 120.0
    # Further attempts after a connection error, a timeout, a 429 or a 5xx (0: no retry).
    retries: int = 4
    # Wait before the first retry, doubled at each further one.
    backoff_s: float = 0.5
    # Name of the environment variable holding the API key, sent as "Authorization: Bearer <key>"
    # (null: no key). The key itself is never read from, or written to, the config.
    api_key_env: Optional[str] = None

    def check(self) -> None:
        parsed = urlparse(self.url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"url must be http(s)://host[:port], got {self.url!r}")
        if parsed.path.rstrip("/").endswith("/v1/completions") or parsed.path.rstrip("/").endswith("/v1"):
            raise ValueError(f"url is the server's base (http://host:port), without /v1: got {self.url!r}")
        for name in ("batch_size", "concurrency"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("connect_timeout_s", "read_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.extra_logprobs < 0:
            raise ValueError(f"extra_logprobs must be >= 0, got {self.extra_logprobs}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.backoff_s < 0:
            raise ValueError(f"backoff_s must be >= 0, got {self.backoff_s}")
        if self.api_key_env is not None and not self.api_key_env.replace("_", "").isalnum():
            raise ValueError(f"api_key_env names an environment variable (letters, digits, _), got {self.api_key_env!r}")

    def api_key(self) -> Optional[str]:
        """The key from the environment of the process the backend starts in (a Ray worker's, which
        may differ from the one that composed the config); never stored in the config."""
        if self.api_key_env is None:
            return None
        key = os.environ.get(self.api_key_env)
        if not key:
            raise ModelError(f"teacher.backend.api_key_env={self.api_key_env}: that environment variable is not set "
                             "where the teacher worker runs")
        return key

    @property
    def endpoint(self) -> str:
        return self.url.rstrip("/") + "/v1/completions"
