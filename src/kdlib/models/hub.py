"""The Hugging Face Hub, reached once: a run that names models by hub id fails in seconds, not minutes.

``huggingface_hub`` retries a connection that cannot be made five times with backoff, for every file
it looks up, so a machine without access to the hub used to print a screen of retries for half a
minute before the error. Before any model config is read, :func:`check_hub` tries one connection to
the hub's endpoint (a few seconds) when the run names a model by hub id. Reachable: nothing changes.
Unreachable: a model that is in the local hub cache is used from it (the run switches
``huggingface_hub`` to offline mode, with one log line saying so); one that is not is a one-line
error naming its config key. ``HF_HUB_OFFLINE=1`` skips the check (nothing is downloaded then).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import Optional
from urllib.parse import urlparse

from kdlib.config.schema import KDConfig
from kdlib.errors import ModelError
from kdlib.locations import looks_like_path, resolve_location

log = logging.getLogger(__name__)

CONNECT_SECONDS = 5.0


def hub_models(cfg: KDConfig) -> dict[str, tuple[str, Optional[str]]]:
    """The run's models and tokenizers named by hub id: config key -> (repo id, revision)."""
    named: dict[str, tuple[str, Optional[str]]] = {}
    roles = {"teacher": cfg.teacher, "student": cfg.student}
    roles.update({f"teachers.{name}": teacher for name, teacher in cfg.teachers.items()})
    for role, model in roles.items():
        for key in ("model", "tokenizer"):
            spec = getattr(model, key, None)
            if spec and _is_hub_id(spec):
                named[f"{role}.{key}"] = (spec, model.revision)
    return named


def check_hub(cfg: KDConfig, *, connect_seconds: float = CONNECT_SECONDS) -> None:
    """Fail in one line, before any download, when a hub model is needed and the hub cannot be
    reached; use cached copies offline when every one is cached."""
    from huggingface_hub import constants

    named = hub_models(cfg)
    if not named or constants.is_offline_mode():
        return
    endpoint = constants.ENDPOINT
    if _reachable(endpoint, connect_seconds):
        return
    missing = [f"{key}={repo}" for key, (repo, revision) in named.items() if not _cached(repo, revision)]
    if missing:
        raise ModelError(f"cannot reach {endpoint} (no connection in {connect_seconds:.0f} s) to download "
                         f"{', '.join(missing)}, and it is not in the local hub cache ({constants.HF_HUB_CACHE}): "
                         "connect to the hub, or give a local directory")
    constants.HF_HUB_OFFLINE = True
    os.environ["HF_HUB_OFFLINE"] = "1"  # worker processes started from here read it too
    log.info("cannot reach %s: using the cached copies of %s (offline)", endpoint,
             ", ".join(repo for repo, _ in named.values()))


def _is_hub_id(spec: str) -> bool:
    if looks_like_path(spec):
        return False
    try:
        return not Path(resolve_location(spec)).exists()
    except FileNotFoundError:
        return False


def _reachable(endpoint: str, timeout: float) -> bool:
    url = urlparse(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=timeout):
            return True
    except OSError:
        return False


def _cached(repo: str, revision: Optional[str]) -> bool:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, "config.json", revision=revision)
    if not isinstance(found, str):
        found = try_to_load_from_cache(repo, "tokenizer_config.json", revision=revision)
    return isinstance(found, str)
