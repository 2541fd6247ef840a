"""The teacher cache degrades instead of stopping a run: a full or unwritable disk warns once and
the run goes on with the live teacher, a failed read is retried before anything is set aside, an
I/O error that persists does not take the shard from other jobs, and the caller learns which keys
it could not serve (docs/teacher_cache.md, "Safety")."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from kdlib.cache.fingerprint import FORMAT, CacheNamespace
from kdlib.cache.shards import DAMAGED, MISSING, UNREADABLE
from kdlib.cache.store import TeacherCache
from kdlib.teacher_output import TeacherOutput

NS = CacheNamespace(FORMAT, "w", "t", "bfloat16", "hf", "sdpa", "cpu", "tok", "bfloat16")
KEYS = [f"{i:032x}" for i in range(1, 5)]


def _sample(seed: int, rows: int = 3) -> TeacherOutput:
    g = torch.Generator().manual_seed(seed)
    return TeacherOutput(torch.randn(rows, 8, generator=g).bfloat16(), row_offsets=torch.tensor([0, rows]))


@pytest.fixture
def filled(tmp_path):
    """A cache with KEYS[0:2] in one shard and KEYS[2:4] in another."""
    cache = TeacherCache.open(tmp_path / "cache", NS)
    first = cache.write({KEYS[0]: _sample(1), KEYS[1]: _sample(2, rows=2)})
    second = cache.write({KEYS[2]: _sample(3), KEYS[3]: _sample(4, rows=4)})
    return tmp_path / "cache", first, second


def _no_temporary_files(root) -> bool:
    return not [p for p in root.rglob("*") if p.name.endswith(".tmp")]


def test_a_full_disk_warns_once_and_writing_stops(tmp_path, monkeypatch, caplog):
    root = tmp_path / "cache"
    caches = [TeacherCache.open(root, NS), TeacherCache.open(root, NS)]  # e.g. the controller's and a worker's
    real_fsync = os.fsync

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full)
    with caplog.at_level("WARNING"):
        results = [cache.write({key: _sample(i)}) for i, key in enumerate(KEYS) for cache in caches]
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert results == [None] * 8 and not any(cache.writable for cache in caches)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"teacher cache {root}: cannot write (No space left on device [ENOSPC]); this run goes on "
                        "without writing to the cache, with the live teacher"]
    assert _no_temporary_files(root) and caches[0].missing(KEYS) == KEYS
    assert caches[0].stats.write_failures == 1 and caches[0].write({KEYS[0]: _sample(0)}) is None  # not retried


def test_a_cache_that_cannot_be_created_is_an_empty_cache(tmp_path, caplog):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with caplog.at_level("WARNING"):
        cache = TeacherCache.open(blocker / "cache", NS)
    assert "cannot create it (Not a directory [ENOTDIR]); this run goes on without the cache" in caplog.text
    assert cache.write({KEYS[0]: _sample(1)}) is None and cache.missing(KEYS[:1]) == KEYS[:1]
    assert cache.fetch(KEYS[:1]).unserved == {KEYS[0]: MISSING}
    assert len(TeacherCache.for_reading(blocker / "cache")) == 0  # the students' view: empty, no error


def test_temporary_files_go_away_whatever_stops_a_write(tmp_path, monkeypatch):
    from kdlib.cache import shards

    path = tmp_path / "x.bin"
    for failure in (OSError(errno.EIO, "I/O error"), KeyboardInterrupt()):
        def fail(fd, failure=failure):
            raise failure

        monkeypatch.setattr(os, "fsync", fail)
        with pytest.raises(type(failure)):
            shards.write_atomic(path, b"\x01\x02" * 100)
        monkeypatch.undo()
        assert list(tmp_path.iterdir()) == []


_FILL_A_TMPFS = textwrap.dedent('''
    import logging, sys, torch
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    from kdlib.cache.fingerprint import FORMAT, CacheNamespace
    from kdlib.cache.store import TeacherCache
    from kdlib.teacher_output import TeacherOutput
    cache = TeacherCache.open(sys.argv[1], CacheNamespace(FORMAT, "w", "t", "bfloat16", "hf", "sdpa", "cpu", "tok", "bfloat16"))
    g = torch.Generator().manual_seed(0)
    results = [cache.write({f"{i:032x}": TeacherOutput(torch.randn(64, 64, generator=g).bfloat16(),
                                                       row_offsets=torch.tensor([0, 64]))}) for i in range(1, 40)]
    print("written", sum(r is not None for r in results), "refused", sum(r is None for r in results))
''')


def test_a_real_full_disk(tmp_path):
    """A 96 KiB tmpfs in a private mount namespace: the first shards fit, then the disk is full."""
    if shutil.which("unshare") is None:
        pytest.skip("needs unshare")
    root = tmp_path / "cache"
    root.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(_FILL_A_TMPFS)
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size=96k tmpfs {root} || exit 77; {sys.executable} {script} {root}; "
                          f"echo rc=$?; ls -a {root} {root}/shards"], capture_output=True, text=True, timeout=300)
    if "rc=" not in out.stdout:
        pytest.skip(f"no private tmpfs here: {out.stderr.strip()[:200]}")
    written, refused = (int(w) for w in out.stdout.split("written ")[1].split()[0:3:2])
    assert "rc=0" in out.stdout and written >= 1 and refused >= 1, out.stdout + out.stderr
    assert out.stderr.count("cannot write (No space left on device [ENOSPC])") == 1, out.stderr
    assert "Traceback" not in out.stderr and ".tmp" not in out.stdout


def test_a_read_that_fails_once_is_retried_and_nothing_is_set_aside(filled, monkeypatch):
    import safetensors

    root, _, _ = filled
    real, failures = safetensors.safe_open, []

    def flaky(*args, **kwargs):
        if not failures:
            failures.append(1)
            raise OSError(errno.EIO, "Input/output error")
        return real(*args, **kwargs)

    cache = TeacherCache.for_reading(root)
    monkeypatch.setattr(safetensors, "safe_open", flaky)
    read = cache.fetch(KEYS)
    assert read.unserved == {} and torch.equal(read.output.hidden[:3], _sample(1).hidden)
    assert cache.stats.retried == 1 and not list((root / "shards").glob("*.corrupt"))


def test_an_io_error_that_persists_is_not_damage(filled, monkeypatch, caplog):
    import safetensors

    root, first, _ = filled
    real = safetensors.safe_open

    def broken_first_shard(path, *args, **kwargs):
        if str(path) == str(first):
            raise OSError(errno.EIO, "Input/output error")
        return real(path, *args, **kwargs)

    cache = TeacherCache.for_reading(root)
    monkeypatch.setattr(safetensors, "safe_open", broken_first_shard)
    with caplog.at_level("WARNING"):
        read = cache.fetch(KEYS)
    assert read.output is None and read.unserved == {KEYS[0]: UNREADABLE, KEYS[1]: UNREADABLE}
    assert first.exists() and "cannot be read now (Input/output error [EIO])" in caplog.text
    assert cache.stats.unreadable == 2 and cache.stats.corrupt == 0
    monkeypatch.undo()
    other_job = TeacherCache.for_reading(root)  # the shard is still there for everyone else
    assert other_job.fetch(KEYS).unserved == {}


def test_damage_is_set_aside_after_the_retry_and_recomputed_entries_are_written_again(filled, caplog):
    root, first, second = filled
    data = bytearray(first.read_bytes())
    data[-5] ^= 0x40  # inside the tensors: the checksum of a sample no longer matches
    first.write_bytes(bytes(data))
    student, teacher = TeacherCache.for_reading(root), TeacherCache.open(root, NS)
    with caplog.at_level("WARNING"):
        read = student.fetch(KEYS)
    assert read.output is None and read.unserved == {KEYS[0]: DAMAGED, KEYS[1]: DAMAGED}
    assert student.stats.retried == 1 and student.stats.corrupt == 2
    assert not first.exists() and first.with_suffix(".corrupt").exists() and second.exists()
    assert caplog.text.count("is damaged") == 1

    # the teacher recomputes the samples and writes them again, though its view of the cache is
    # older than the damage
    assert teacher.missing(KEYS) == []
    assert teacher.write({KEYS[0]: _sample(1), KEYS[1]: _sample(2, rows=2)}) is not None
    assert student.fetch(KEYS).unserved == {}


def test_forget_makes_keys_missing_in_this_process_only(filled):
    root, _, _ = filled
    cache = TeacherCache.for_reading(root)
    cache.forget(KEYS[:1])
    assert cache.missing(KEYS) == KEYS[:1] and cache.fetch(KEYS).unserved == {KEYS[0]: MISSING}
    assert TeacherCache.for_reading(root).missing(KEYS) == []
