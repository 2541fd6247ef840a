"""An unloaded teacher gives its memory back: teachers taking turns on a CPU otherwise keep the
freed weights' heap pages, and each turn's load came on top (peak RSS +16% over 12 steps)."""

import gc
import os
import platform
from types import SimpleNamespace

import pytest
import torch

from kdlib.workers import teacher as teacher_module
from kdlib.workers.teacher import TeacherWorker, return_freed_heap

glibc = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                           reason="malloc_trim is glibc's")


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@glibc
def test_freed_small_tensors_leave_the_process_after_return_freed_heap():
    tensors = [torch.ones(16384) for _ in range(2000)]  # 64 KiB each (on the C heap), 128 MiB, touched
    top = torch.ones(16384)  # allocated after them: the heap's top stays in use, so free() cannot shrink it
    del tensors
    gc.collect()
    before = resident_bytes()
    assert return_freed_heap()
    released = before - resident_bytes()
    assert released > 64 * 2**20, f"only {released / 2**20:.1f} MiB returned"
    assert top.sum().item() == 16384


def test_unloading_a_teacher_returns_the_heap(monkeypatch):
    calls = []
    monkeypatch.setattr(teacher_module, "return_freed_heap", lambda: calls.append(True) or True)
    worker = SimpleNamespace(backend=object(), device=torch.device("cpu"))
    TeacherWorker.unload(worker)
    assert worker.backend is None and calls == [True]
