"""The teacher cache on disk: per-sample teacher outputs in safetensors shards, safe to share.

Layout of a cache directory (``teacher.cache=DIR``)::

    DIR/manifest.json                 the namespace (see fingerprint.py): which teacher, tokenizer,
                                      dtypes; a run with another namespace is refused
    DIR/shards/<id>.safetensors       one shard per write: tensor "<key>" = the sample's hidden
                                      states [rows, hidden] (wire dtype), "<key>.topk_ids" / ...
                                      when the engine sent them; metadata: format, per-key
                                      checksums (blake2b of the bytes) and row counts
    DIR/index.json                    key -> shard, a convenience for people and a start-up
                                      shortcut; the shards' own headers are the truth

Every write goes to a temporary file in the same directory and is renamed into place, so a reader
(another sweep job, another Ray worker) sees a shard whole or not at all, and two processes filling
one cache never write the same file. A shard that cannot be read, or a sample whose bytes do not
match their checksum, is reported once, moved aside (``*.corrupt``) and its samples count as
missing, so they are recomputed rather than trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

import torch

from kdlib.cache.fingerprint import FORMAT, CacheNamespace
from kdlib.errors import ConfigError
from kdlib.teacher_output import TeacherOutput

log = logging.getLogger(__name__)

_CARRIED = ("hidden", "topk_ids", "topk_logprobs")  # per-row fields a cache keeps


@dataclass
class CacheStats:
    """What one process's cache did (additive, for metrics and the fill summary)."""

    hits: int = 0
    misses: int = 0
    written: int = 0
    rows_written: int = 0
    bytes_written: int = 0
    corrupt: int = 0

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


@dataclass
class _Location:
    shard: str
    rows: int
    checksum: str


@dataclass
class TeacherCache:
    """One cache directory, opened for a namespace (refused when it holds another)."""

    root: Path
    namespace: CacheNamespace
    stats: CacheStats = field(default_factory=CacheStats)
    _index: dict[str, _Location] = field(default_factory=dict)
    _scanned: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: str | Path, namespace: CacheNamespace) -> "TeacherCache":
        root = Path(root)
        (root / "shards").mkdir(parents=True, exist_ok=True)
        manifest = root / "manifest.json"
        if not manifest.exists():
            _write_atomic(manifest, json.dumps(namespace.as_dict(), indent=2).encode(), exclusive=True)
        stored = json.loads(manifest.read_text(encoding="utf-8"))
        if stored.get("format") != FORMAT:
            raise ConfigError(f"teacher.cache={root}: format {stored.get('format')!r} is not {FORMAT!r}")
        try:
            stored_ns = CacheNamespace(**stored)
        except TypeError:
            raise ConfigError(f"teacher.cache={root}: manifest.json is not a kdlib teacher cache manifest") from None
        differences = stored_ns.differences(namespace)
        if differences:
            raise ConfigError(
                f"teacher.cache={root} holds outputs of another teacher setup ({stored_ns.teacher_model}): "
                + "; ".join(differences) + "; use another directory"
            )
        cache = cls(root=root, namespace=namespace)
        cache.refresh()
        return cache

    @classmethod
    def for_reading(cls, root: str | Path) -> "TeacherCache":
        """A cache opened by a reader that trusts the controller's namespace check (students)."""
        root = Path(root)
        stored = json.loads((root / "manifest.json").read_text(encoding="utf-8"))
        cache = cls(root=root, namespace=CacheNamespace(**stored))
        cache.refresh()
        return cache

    # ------------------------------------------------------------------------------------------
    # Index

    def refresh(self) -> None:
        """Learn about shards written since the last look (by this or any other process)."""
        index_file = self.root / "index.json"
        if not self._scanned and index_file.exists():
            try:
                listed = json.loads(index_file.read_text(encoding="utf-8"))
                for shard, entries in listed.items():
                    if (self.root / "shards" / shard).exists():
                        for key, (rows, checksum) in entries.items():
                            self._index.setdefault(key, _Location(shard, rows, checksum))
                        self._scanned.add(shard)
            except (ValueError, TypeError):
                log.warning("teacher cache %s: index.json is unreadable; scanning the shards", self.root)
        for path in sorted((self.root / "shards").glob("*.safetensors")):
            if path.name in self._scanned:
                continue
            entries = self._read_header(path)
            self._scanned.add(path.name)
            for key, (rows, checksum) in (entries or {}).items():
                self._index.setdefault(key, _Location(path.name, rows, checksum))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self._index]

    def verified_missing(self, keys: Iterable[str]) -> list[str]:
        """Like :meth:`missing`, after reading every present entry of ``keys`` and checking its
        checksum: damaged shards are set aside first, so their samples count as missing."""
        from safetensors import safe_open

        keys = list(keys)
        by_shard: dict[str, list[str]] = {}
        for key in dict.fromkeys(keys):
            if key in self._index:
                by_shard.setdefault(self._index[key].shard, []).append(key)
        for shard, shard_keys in by_shard.items():
            path = self.root / "shards" / shard
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for key in shard_keys:
                        if self._checked_fields(handle, key) is None:
                            raise _Damaged(f"checksum mismatch for sample {key}")
            except _UNREADABLE as exc:
                self._quarantine(path, str(exc))
        return self.missing(keys)

    def write_index(self) -> Path:
        """Write ``index.json`` (shard -> {key: [rows, checksum]}) atomically."""
        self.refresh()
        by_shard: dict[str, dict[str, list]] = {}
        for key, loc in sorted(self._index.items()):
            by_shard.setdefault(loc.shard, {})[key] = [loc.rows, loc.checksum]
        path = self.root / "index.json"
        _write_atomic(path, json.dumps(by_shard, sort_keys=True).encode())
        return path

    # ------------------------------------------------------------------------------------------
    # Reading and writing

    def read(self, keys: list[str], sample_ids: Optional[list[int]] = None) -> Optional[TeacherOutput]:
        """The outputs of ``keys`` joined in order, or None when any is missing or damaged."""
        from safetensors import safe_open

        parts: list[TeacherOutput] = []
        by_shard: dict[str, list[int]] = {}
        if self.missing(keys):
            self.refresh()  # written by another process since this one last looked
        for i, key in enumerate(keys):
            loc = self._index.get(key)
            if loc is None:
                self.stats.misses += 1
                return None
            by_shard.setdefault(loc.shard, []).append(i)
        found: dict[int, TeacherOutput] = {}
        for shard, positions in by_shard.items():
            path = self.root / "shards" / shard
            try:
                with safe_open(str(path), framework="pt") as handle:
                    for i in positions:
                        tensors = self._checked_fields(handle, keys[i])
                        if tensors is None:
                            raise _Damaged(f"checksum mismatch for sample {keys[i]}")
                        found[i] = TeacherOutput(row_offsets=torch.tensor([0, tensors["hidden"].shape[0]]), **tensors)
            except _UNREADABLE as exc:
                self._quarantine(path, str(exc))
                self.stats.misses += len(keys)
                return None
        parts = [found[i] for i in range(len(keys))]
        self.stats.hits += len(keys)
        output = TeacherOutput.concat(parts)
        if sample_ids is not None:
            output.sample_ids = torch.tensor(sample_ids, dtype=torch.long)
        return output

    def write(self, entries: dict[str, TeacherOutput]) -> Optional[Path]:
        """Write the samples of ``entries`` not cached yet as one new shard; returns its path."""
        from safetensors.torch import save

        new = {k: v for k, v in entries.items() if k not in self._index}
        if not new:
            return None
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, list] = {}
        for key, output in new.items():
            fields = {f: getattr(output, f) for f in _CARRIED if getattr(output, f) is not None}
            fields = {f: t.detach().to("cpu").contiguous() for f, t in fields.items()}
            meta[key] = [int(fields["hidden"].shape[0]), _checksum(fields)]
            tensors.update({_name(key, f): t for f, t in fields.items()})
        name = f"{uuid.uuid4().hex}.safetensors"
        blob = save(tensors, metadata={"format": FORMAT, "samples": json.dumps(meta)})
        path = self.root / "shards" / name
        _write_atomic(path, blob)
        for key, (rows, checksum) in meta.items():
            self._index.setdefault(key, _Location(name, rows, checksum))
        self._scanned.add(name)
        self.stats.written += len(meta)
        self.stats.rows_written += sum(rows for rows, _ in meta.values())
        self.stats.bytes_written += len(blob)
        return path

    def disk_bytes(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "shards").glob("*.safetensors"))

    def total_rows(self) -> int:
        return sum(loc.rows for loc in self._index.values())

    # ------------------------------------------------------------------------------------------

    def _checked_fields(self, handle, key: str) -> Optional[dict[str, torch.Tensor]]:
        """The stored fields of ``key`` from an open shard, or None when they fail the checksum."""
        names = set(handle.keys())
        tensors = {f: handle.get_tensor(_name(key, f)) for f in _CARRIED if _name(key, f) in names}
        return tensors if _checksum(tensors) == self._index[key].checksum else None

    def _read_header(self, path: Path) -> Optional[dict[str, list]]:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT:
                raise _Damaged(f"format {metadata.get('format')!r}")
            return json.loads(metadata["samples"])
        except _UNREADABLE as exc:
            self._quarantine(path, str(exc))
            return None

    def _quarantine(self, path: Path, why: str) -> None:
        """Stop trusting a damaged shard: move it aside, forget its samples, count them."""
        lost = [k for k, loc in self._index.items() if loc.shard == path.name]
        for key in lost:
            del self._index[key]
        self.stats.corrupt += max(len(lost), 1)
        try:
            os.replace(path, path.with_suffix(".corrupt"))
        except OSError:
            pass  # another process moved it first
        log.warning("teacher cache: shard %s is damaged (%s); its %d samples will be recomputed",
                    path.name, why.splitlines()[0] if why else "unreadable", len(lost))


class _Damaged(Exception):
    """A shard or sample failed its integrity check."""


def _unreadable() -> tuple[type[BaseException], ...]:
    from safetensors import SafetensorError

    return (_Damaged, SafetensorError, OSError, RuntimeError, KeyError, ValueError)


_UNREADABLE = _unreadable()


def _name(key: str, field_name: str) -> str:
    return key if field_name == "hidden" else f"{key}.{field_name}"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        digest.update(name.encode())
        digest.update(str(t.dtype).encode())
        digest.update(repr(tuple(t.shape)).encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _write_atomic(path: Path, data: bytes, *, exclusive: bool = False) -> None:
    """Write ``data`` to ``path`` whole or not at all; with ``exclusive`` an existing file wins."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with tmp.open("wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    if exclusive:
        try:
            os.link(tmp, path)  # fails if another process created it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    else:
        os.replace(tmp, path)
