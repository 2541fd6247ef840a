"""The teacher cache on disk: per-sample teacher outputs in safetensors shards, safe to share.

Layout of a cache directory (``teacher.cache=DIR``)::

    DIR/manifest.json                 the namespace (see fingerprint.py): which teacher, tokenizer,
                                      dtypes; a run with another namespace is refused
    DIR/shards/<32 hex>.safetensors   one shard per write: tensor "<key>" = the sample's hidden
                                      states [rows, hidden] (wire dtype), or "<key>.topk_ids",
                                      "<key>.topk_logprobs", ... for the namespace's sparse signal;
                                      metadata: format, per-key checksums (blake2b of the bytes)
                                      and row counts
    DIR/index.json                    key -> shard, a convenience for people and a start-up
                                      shortcut; the shards' own headers are the truth

Every write goes to a temporary file in the same directory and is renamed into place, so a reader
(another sweep job, another Ray worker) sees a shard whole or not at all, and two processes filling
one cache never write the same file.

Nothing read from the directory is trusted: shard names (from ``index.json`` or a listing) must
be the names kdlib writes and keys the sample keys it computes, so no name can reach outside
``DIR/shards`` (symbolic links there are ignored); a shard or a sample whose bytes do not match
their checksum is damage. The cache is an optimisation, so it degrades instead of stopping a run:

- a read that fails is retried once; damage still there after the retry is reported once, the
  shard is moved aside (``*.corrupt``, only ever a file of ``DIR/shards``) and its samples count
  as missing, so they are recomputed rather than trusted. An I/O error that persists (EIO,
  EAGAIN, ...) is not damage: the shard stays for the other jobs reading it, this process just
  does not use it.
- a write that fails (a full disk, a read-only or unwritable directory) leaves no temporary file,
  warns once per process and turns writing off: the run goes on with the live teacher.

:meth:`TeacherCache.fetch` says which keys it could not serve and why, for a caller that
recomputes them; :meth:`TeacherCache.forget` drops keys from this process's view of the cache.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, TypeVar

import torch

from kdlib.cache.fingerprint import FORMAT, CacheNamespace
from kdlib.cache.shards import (
    CARRIED, DAMAGED, HEX32, MISSING, SHARD_NAME, UNREADABLE, UNREADABLE_ERRORS, CacheRead, CacheStats,
    Damaged, Location, check_confined, is_regular_file, os_reason, read_manifest, tensor_name, valid_entries,
    tensors_checksum, write_atomic,
)
from kdlib.errors import ConfigError, first_line
from kdlib.teacher_output import TeacherOutput

log = logging.getLogger(__name__)

_RETRY_DELAY_S = 0.1  # before the second try of a failed read
_WARNED: set[tuple[str, str]] = set()  # (cache root, what): warnings given once per process


T = TypeVar("T")


@dataclass
class TeacherCache:
    """One cache directory, opened for a namespace (refused when it holds another)."""

    root: Path
    namespace: Optional[CacheNamespace]  # None: a reader's cache that was never created
    stats: CacheStats = field(default_factory=CacheStats)
    writable: bool = True  # False after a write failed: the run goes on without writing
    enabled: bool = True  # False when the directory could not be created: always empty
    _index: dict[str, Location] = field(default_factory=dict)
    _scanned: set[str] = field(default_factory=set)

    @classmethod
    def open(cls, root: str | Path, namespace: CacheNamespace) -> "TeacherCache":
        """Open (or create) ``root`` for ``namespace``. A directory that cannot be created (no
        permission, a full disk) warns once and gives an empty cache that writes nothing."""
        root = Path(root)
        manifest = root / "manifest.json"
        try:
            (root / "shards").mkdir(parents=True, exist_ok=True)
            if not manifest.exists():
                write_atomic(manifest, json.dumps(namespace.as_dict(), indent=2).encode(), exclusive=True)
        except OSError as exc:
            if not manifest.exists():
                cache = cls(root=root, namespace=namespace, writable=False, enabled=False)
                cache._warn_once("write", "teacher cache %s: cannot create it (%s); this run goes on without the "
                                 "cache, with the live teacher", root, os_reason(exc))
                return cache
        stored_ns = read_manifest(root)
        if stored_ns.signal != namespace.signal:
            raise ConfigError(
                f"teacher.cache={root} holds the teacher signal {stored_ns.signal!r}, this run's teacher.signal is "
                f"{namespace.signal!r}: a cache serves one signal; use another directory"
            )
        differences = stored_ns.differences(namespace)
        if differences:
            raise ConfigError(
                f"teacher.cache={root} holds outputs of another teacher setup ({stored_ns.teacher_model}): "
                + "; ".join(differences) + "; use another directory"
            )
        check_confined(root)
        cache = cls(root=root, namespace=namespace)
        cache.refresh()
        return cache

    @classmethod
    def for_reading(cls, root: str | Path) -> "TeacherCache":
        """A cache opened by a reader that trusts the controller's namespace check (students);
        empty when the controller could not create it."""
        root = Path(root)
        if not (root / "manifest.json").exists():
            return cls(root=root, namespace=None, writable=False, enabled=False)
        namespace = read_manifest(root)
        check_confined(root)
        cache = cls(root=root, namespace=namespace, writable=False)
        cache.refresh()
        return cache

    # ------------------------------------------------------------------------------------------
    # Index

    def refresh(self) -> None:
        """Learn about shards written since the last look (by this or any other process), and
        forget those that disappeared (set aside by another process)."""
        if not self.enabled:
            return
        on_disk = self._listed_shards()
        for gone in self._scanned - on_disk:
            self._forget_shard(gone)
        if not self._scanned:
            for key, loc in self._listed_index(on_disk).items():
                self._index.setdefault(key, loc)
                self._scanned.add(loc.shard)
        for name in sorted(on_disk - self._scanned):
            entries, _ = self._attempt(name, self._read_header)
            self._scanned.add(name)  # read once per process: one that cannot be read is not used
            for key, (rows, checksum) in (entries or {}).items():
                self._index.setdefault(key, Location(name, rows, checksum))

    def __contains__(self, key: str) -> bool:
        return key in self._index

    def __len__(self) -> int:
        return len(self._index)

    def missing(self, keys: Iterable[str]) -> list[str]:
        return [k for k in keys if k not in self._index]

    def forget(self, keys: Iterable[str]) -> None:
        """Stop serving ``keys`` from this process's view (nothing changes on disk): a caller
        told by another process that they could not be read makes them count as missing."""
        for key in keys:
            self._index.pop(key, None)

    def verified_missing(self, keys: Iterable[str]) -> list[str]:
        """Like :meth:`missing`, after reading every present entry of ``keys`` and checking its
        checksum: damaged shards are set aside first, so their samples count as missing."""
        keys = list(keys)
        for shard, shard_keys in self._by_shard(dict.fromkeys(keys)).items():
            self._attempt(shard, lambda path: self._read_entries(path, shard_keys))
        return self.missing(keys)

    def write_index(self) -> Optional[Path]:
        """Write ``index.json`` (shard -> {key: [rows, checksum]}) atomically (None when the
        directory cannot be written: the index is a convenience)."""
        self.refresh()
        by_shard: dict[str, dict[str, list]] = {}
        for key, loc in sorted(self._index.items()):
            by_shard.setdefault(loc.shard, {})[key] = [loc.rows, loc.checksum]
        path = self.root / "index.json"
        try:
            write_atomic(path, json.dumps(by_shard, sort_keys=True).encode())
        except OSError as exc:
            self._warn_once("index", "teacher cache %s: cannot write index.json (%s)", self.root, os_reason(exc))
            return None
        return path

    # ------------------------------------------------------------------------------------------
    # Reading and writing

    def read(self, keys: list[str], sample_ids: Optional[list[int]] = None) -> Optional[TeacherOutput]:
        """The outputs of ``keys`` joined in order, or None when any is missing or damaged."""
        return self.fetch(keys, sample_ids).output

    def fetch(self, keys: list[str], sample_ids: Optional[list[int]] = None) -> CacheRead:
        """The outputs of ``keys`` joined in order, and the keys that could not be served with
        the reason (a caller can recompute exactly those; damaged shards are already set aside)."""
        if self.missing(keys):
            self.refresh()  # written by another process since this one last looked
        unserved = {k: MISSING for k in self.missing(keys)}
        if unserved:
            self.stats.misses += len(unserved)
            return CacheRead(None, unserved)
        found: dict[str, dict[str, torch.Tensor]] = {}
        for shard, shard_keys in self._by_shard(keys).items():
            tensors, failure = self._attempt(shard, lambda path: self._read_entries(path, shard_keys))
            if failure is None:
                found.update(tensors)
            else:
                unserved.update({k: failure for k in shard_keys})
        if unserved:
            self.stats.misses += len(unserved)
            return CacheRead(None, unserved)
        self.stats.hits += len(keys)
        output = TeacherOutput.concat(
            [TeacherOutput(row_offsets=torch.tensor([0, next(iter(found[k].values())).shape[0]]), **found[k])
             for k in keys]
        )
        if sample_ids is not None:
            output.sample_ids = torch.tensor(sample_ids, dtype=torch.long)
        return CacheRead(output, {})

    def write(self, entries: dict[str, TeacherOutput]) -> Optional[Path]:
        """Write the samples of ``entries`` not cached yet as one new shard; returns its path, or
        None when there was nothing new or the write failed (warned once; writing stops)."""
        from safetensors.torch import save

        if not self.writable:
            return None
        for key in entries:
            if not HEX32.fullmatch(key):
                raise ValueError(f"teacher cache key {key!r} is not a sample key (32 hex digits)")
        for shard in {self._index[k].shard for k in entries if k in self._index}:
            if not (self.root / "shards" / shard).exists():  # set aside by another process: write anew
                self._forget_shard(shard)
        new = {k: v for k, v in entries.items() if k not in self._index}
        if not new:
            return None
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, list] = {}
        for key, output in new.items():
            fields = {f: getattr(output, f) for f in CARRIED if getattr(output, f) is not None}
            fields = {f: t.detach().to("cpu").contiguous() for f, t in fields.items()}
            meta[key] = [output.n_rows, tensors_checksum(fields)]
            tensors.update({tensor_name(key, f): t for f, t in fields.items()})
        name = f"{uuid.uuid4().hex}.safetensors"
        blob = save(tensors, metadata={"format": FORMAT, "samples": json.dumps(meta)})
        path = self.root / "shards" / name
        try:
            write_atomic(path, blob)
        except OSError as exc:
            self.writable = False
            self.stats.write_failures += 1
            self._warn_once("write", "teacher cache %s: cannot write (%s); this run goes on without writing "
                            "to the cache, with the live teacher", self.root, os_reason(exc))
            return None
        for key, (rows, checksum) in meta.items():
            self._index.setdefault(key, Location(name, rows, checksum))
        self._scanned.add(name)
        self.stats.written += len(meta)
        self.stats.rows_written += sum(rows for rows, _ in meta.values())
        self.stats.bytes_written += len(blob)
        return path

    def disk_bytes(self) -> int:
        return sum((self.root / "shards" / name).stat().st_size for name in self._listed_shards())

    def total_rows(self) -> int:
        return sum(loc.rows for loc in self._index.values())

    # ------------------------------------------------------------------------------------------
    # Reading one shard, with a retry; setting damage aside

    def _attempt(self, shard: str, action: Callable[[Path], T]) -> tuple[Optional[T], Optional[str]]:
        """``(action(path of shard), None)``, or ``(None, DAMAGED / UNREADABLE / MISSING)`` after a
        second try failed too. Damage is set aside; a persistent I/O error only makes this process
        stop using the shard; a vanished shard (set aside by another process) is forgotten."""
        path = self.root / "shards" / shard
        failure: BaseException | None = None
        for attempt in range(2):
            if attempt:
                self.stats.retried += 1
                time.sleep(_RETRY_DELAY_S)
            try:
                return action(path), None
            except FileNotFoundError:
                self._forget_shard(shard)
                return None, MISSING
            except UNREADABLE_ERRORS as exc:
                failure = exc
        if isinstance(failure, OSError):
            lost = self._forget_shard(shard)
            self.stats.unreadable += len(lost)
            self._warn_once(f"unreadable {shard}", "teacher cache: shard %s cannot be read now (%s); its samples are "
                            "not used by this process (the shard is kept)", shard, os_reason(failure))
            return None, UNREADABLE
        self._quarantine(shard, first_line(failure))
        return None, DAMAGED

    def _read_entries(self, path: Path, keys: list[str]) -> dict[str, dict[str, torch.Tensor]]:
        """The checked fields of ``keys`` from one shard; Damaged on a checksum mismatch."""
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt") as handle:
            names = set(handle.keys())
            for key in keys:
                tensors = {f: handle.get_tensor(tensor_name(key, f)) for f in CARRIED if tensor_name(key, f) in names}
                if tensors_checksum(tensors) != self._index[key].checksum:
                    raise Damaged(f"checksum mismatch for sample {key}")
                out[key] = tensors
        return out

    def _read_header(self, path: Path) -> dict[str, tuple[int, str]]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise Damaged(f"format {metadata.get('format')!r}")
        entries = valid_entries(json.loads(metadata["samples"]))
        if entries is None:
            raise Damaged("its sample list is not the one kdlib writes")
        return entries

    def _quarantine(self, shard: str, why: str) -> None:
        """Stop trusting a damaged shard: move it aside, forget its samples, count them. Only a
        regular file of ``shards/`` with a kdlib shard name is ever renamed."""
        lost = self._forget_shard(shard)
        self.stats.corrupt += max(len(lost), 1)
        path = self.root / "shards" / shard
        if SHARD_NAME.fullmatch(shard) and is_regular_file(path):
            try:
                os.replace(path, path.with_suffix(".corrupt"))
            except OSError:
                pass  # another process moved it first, or the directory is read-only
        log.warning("teacher cache: shard %s is damaged (%s); its %d samples will be recomputed",
                    shard, why or "unreadable", len(lost))

    def _forget_shard(self, shard: str) -> list[str]:
        """Drop a shard from this process's index; returns the keys it held."""
        lost = [k for k, loc in self._index.items() if loc.shard == shard]
        for key in lost:
            del self._index[key]
        self._scanned.discard(shard)
        return lost

    def _by_shard(self, keys: Iterable[str]) -> dict[str, list[str]]:
        by_shard: dict[str, list[str]] = {}
        for key in keys:
            if key in self._index:
                by_shard.setdefault(self._index[key].shard, []).append(key)
        return by_shard

    def _listed_shards(self) -> set[str]:
        """Names of the shard files in ``shards/`` (kdlib names, regular files, no links)."""
        names = set()
        for path in (self.root / "shards").glob("*.safetensors"):
            if SHARD_NAME.fullmatch(path.name) and is_regular_file(path):
                names.add(path.name)
            else:
                self._warn_once(f"ignored {path.name}", "teacher cache %s: ignoring shards/%s (not a file kdlib "
                                "wrote: another name, or a symbolic link)", self.root, path.name)
        return names

    def _listed_index(self, on_disk: set[str]) -> dict[str, Location]:
        """The entries of ``index.json`` whose shards exist; an index that is not exactly what
        kdlib writes is ignored as a whole (the shards' headers are read instead)."""
        index_file = self.root / "index.json"
        if not index_file.is_file():
            return {}
        try:
            listed = json.loads(index_file.read_text(encoding="utf-8"))
            if not isinstance(listed, dict):
                raise ValueError("not an object")
            out = {}
            for shard, entries in listed.items():
                valid = valid_entries(entries)
                if not SHARD_NAME.fullmatch(shard) or valid is None:
                    raise ValueError(f"entry {str(shard)[:80]!r} is not one kdlib writes")
                if shard in on_disk:
                    out.update({key: Location(shard, rows, checksum) for key, (rows, checksum) in valid.items()})
            return out
        except (OSError, ValueError) as exc:
            self._warn_once("index", "teacher cache %s: index.json is not usable (%s); reading the shards' headers",
                            self.root, first_line(exc))
            return {}

    def _warn_once(self, what: str, message: str, *args: Any) -> None:
        if (str(self.root), what) not in _WARNED:
            _WARNED.add((str(self.root), what))
            log.warning(message, *args)


