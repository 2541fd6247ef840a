"""The teacher cache's files: the names and checksums kdlib writes, whole-or-nothing writes, and
the small types a cache read returns.

Nothing read from a cache directory is trusted: :data:`SHARD_NAME` and :data:`HEX32` are the only
names accepted from disk (a shard is a random UUID, a key a 16-byte blake2b digest, a checksum
another one), so no name can reach outside ``DIR/shards``; :func:`write_atomic` writes a file
whole or not at all and leaves no temporary file behind on any failure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import stat
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from kdlib.cache.fingerprint import FORMAT, CacheNamespace
from kdlib.errors import ConfigError, first_line
from kdlib.teacher_output import ROW_FIELDS, TeacherOutput

CARRIED = ROW_FIELDS  # per-row fields a cache keeps (those of the namespace's one signal)


# The names kdlib writes: a shard is a random UUID, a key a 16-byte blake2b digest
# (fingerprint.sample_key), a checksum another one (checksum). Nothing else is accepted from disk.
SHARD_NAME = re.compile(r"[0-9a-f]{32}\.safetensors")


HEX32 = re.compile(r"[0-9a-f]{32}")


# Why a key could not be served (CacheRead.unserved).
MISSING = "missing"  # not in the cache (never written, or its shard was set aside)


DAMAGED = "damaged"  # its shard or bytes failed the integrity check twice: set aside now


UNREADABLE = "unreadable"  # an I/O error, twice; the shard stays for other readers


@dataclass
class CacheStats:
    """What one process's cache did (additive, for metrics and the fill summary)."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    corrupt: int = 0  # samples whose shard was set aside as damaged
    unreadable: int = 0  # samples not served because of an I/O error that persisted
    retried: int = 0  # shard reads that failed once and were tried again
    write_failures: int = 0  # writes given up (full disk, no permission)

    def take(self) -> "CacheStats":
        out = CacheStats(**vars(self))
        for name in vars(self):
            setattr(self, name, 0)
        return out


@dataclass(frozen=True)
class CachedOutput:
    """A handle to a micro-batch's teacher output in the cache (keys in sample order): what the
    controller passes to a student instead of a transport handle when the cache covers a batch."""

    keys: tuple[str, ...]
    sample_ids: tuple[int, ...]
    # The cache directory (None: the run's teacher.cache); several teachers have a cache each.
    root: Optional[str] = None


@dataclass(frozen=True)
class CacheRead:
    """What :meth:`TeacherCache.fetch` found: the joined output when every key was served, else
    None and, for each key that was not, why (:data:`MISSING`, :data:`DAMAGED`, :data:`UNREADABLE`)."""

    output: Optional[TeacherOutput]
    unserved: dict[str, str]


@dataclass
class Location:
    shard: str
    rows: int
    checksum: str


class Damaged(Exception):
    """A shard or sample failed its integrity check."""


def unreadable_errors() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (Damaged, SafetensorError, OSError, RuntimeError, KeyError, ValueError, TypeError)


UNREADABLE_ERRORS = unreadable_errors()


def valid_entries(entries: Any) -> Optional[dict[str, tuple[int, str]]]:
    """``{key: (rows, checksum)}`` when ``entries`` is exactly what kdlib writes, else None."""
    if not isinstance(entries, dict):
        return None
    out = {}
    for key, value in entries.items():
        if not (isinstance(key, str) and HEX32.fullmatch(key) and isinstance(value, list) and len(value) == 2):
            return None
        rows, checksum = value
        if type(rows) is not int or rows < 0 or not (isinstance(checksum, str) and HEX32.fullmatch(checksum)):
            return None
        out[key] = (rows, checksum)
    return out


def read_manifest(root: Path) -> CacheNamespace:
    try:
        stored = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"teacher.cache={root}: cannot read manifest.json: {os_reason(exc)}") from None
    except ValueError as exc:
        raise ConfigError(f"teacher.cache={root}: manifest.json is not JSON ({first_line(exc)}); "
                          "it is not a kdlib teacher cache, or it was damaged: use another directory") from None
    if not isinstance(stored, dict):
        raise ConfigError(f"teacher.cache={root}: manifest.json is not a kdlib teacher cache manifest")
    if stored.get("format") != FORMAT:
        raise ConfigError(f"teacher.cache={root}: format {stored.get('format')!r} is not {FORMAT!r}")
    try:
        return CacheNamespace(**stored)
    except TypeError:
        raise ConfigError(f"teacher.cache={root}: manifest.json is not a kdlib teacher cache manifest") from None


def check_confined(root: Path) -> None:
    """Refuse a cache whose ``shards/`` leads outside it (a symbolic link): every file kdlib
    reads, writes or moves aside is inside ``shards/``."""
    resolved = root.resolve()
    shards = (resolved / "shards").resolve()
    if shards.parent != resolved:
        raise ConfigError(f"teacher.cache={root}: shards/ leads outside the cache directory (to {shards}); refused")


def is_regular_file(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def os_reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"{exc.strerror or exc} [{errno.errorcode.get(exc.errno, exc.errno)}]"
    return first_line(exc)


def tensor_name(key: str, field_name: str) -> str:
    return key if field_name == "hidden" else f"{key}.{field_name}"


def tensors_checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all; with ``exclusive`` an existing file wins.
    The temporary file is removed whatever happens (a full disk, an interrupt)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with tmp.open("wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        if exclusive:
            try:
                os.link(tmp, path)  # fails if another process created it first
            except FileExistsError:
                pass
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
