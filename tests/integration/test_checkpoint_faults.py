"""Checkpoint writes that fail or are killed: the previous checkpoint stays complete and loadable.

Each fault is injected for real: a SIGKILL sent to a run paused inside its second checkpoint write
(in the middle of the DCP shards, or with everything written but not yet renamed into place); a
disk that fills up (a 2.5 MB tmpfs mounted over the checkpoint directory in a private mount
namespace, and a patched write raising ENOSPC where no namespace can be made). Afterwards the
newest complete checkpoint is the previous one, and resuming from it reproduces the
uninterrupted run step by step.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import kdlib
from kdlib.errors import CheckpointError
from kdlib.parallel.checkpoint import complete_checkpoints, latest_checkpoint, partial_dirs

STEPS = ["train.max_steps=3", "train.checkpoint_every=1", "train.keep_checkpoints=2", "eval.before=false"]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _assert_continues(reference: list[dict], resumed: list[dict], first_step: int) -> None:
    """The resumed steps are the uninterrupted run's, to float32 round-off."""
    expected = [r for r in reference if r["step"] >= first_step]
    assert [r["step"] for r in resumed] == [r["step"] for r in expected]
    for a, b in zip(expected, resumed, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-6), (b["step"], key)


_REFERENCE: dict[tuple, list[dict]] = {}


@pytest.fixture
def reference(tiny_overrides, tmp_path) -> list[dict]:
    """The uninterrupted run's metrics (run once per module: the tests share the configuration)."""
    key = tuple(o for o in tiny_overrides if not o.startswith("output_dir="))
    if key not in _REFERENCE:
        run = kdlib.run(kdlib.compose(tiny_overrides + STEPS + [f"output_dir={tmp_path / 'reference'}"]))
        _REFERENCE[key] = _rows(run.run_dir)
    return _REFERENCE[key]


KILLABLE_RUN = textwrap.dedent('''
    """Runs kdlib and pauses inside the second checkpoint write, where the test kills it."""
    import os, sys, time
    from pathlib import Path

    import kdlib
    from kdlib.parallel import checkpoint as ckpt

    ready, where, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
    saves = []
    real_save, real_publish, real_fsync = ckpt.save_checkpoint, ckpt.publish, os.fsync

    def pause():
        Path(ready).write_text(str(os.getpid()))
        time.sleep(600)

    def save_checkpoint(*args, **kwargs):
        saves.append(args[0])
        return real_save(*args, **kwargs)

    def fsync(fd):  # DCP syncs each shard file right after writing it
        real_fsync(fd)
        if where == "shards" and len(saves) == 2:
            pause()

    def publish(staging, final, **kwargs):  # everything written, not yet renamed
        if where == "rename" and len(saves) == 2:
            pause()
        return real_publish(staging, final, **kwargs)

    ckpt.save_checkpoint, ckpt.publish, os.fsync = save_checkpoint, publish, fsync
    kdlib.run(kdlib.compose(overrides))
''')


@pytest.mark.parametrize("where", ["shards", pytest.param("rename", marks=pytest.mark.slow)])
def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_loadable(where, tiny_overrides, reference, tmp_path):
    run_dir, ready = tmp_path / "killed", tmp_path / "ready"
    script = tmp_path / "killable_run.py"
    script.write_text(KILLABLE_RUN)
    overrides = tiny_overrides + STEPS + [f"output_dir={run_dir}"]
    process = subprocess.Popen([sys.executable, str(script), str(ready), where, *overrides], cwd=tmp_path,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not ready.exists():
            assert process.poll() is None, process.stderr.read()
            assert time.monotonic() < deadline, "the run never reached its second checkpoint"
            time.sleep(0.1)
        os.kill(process.pid, signal.SIGKILL)
        assert process.wait(timeout=60) == -signal.SIGKILL
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()

    root = run_dir / "checkpoints"
    assert [step for step, _ in complete_checkpoints(root)] == [1]
    assert latest_checkpoint(run_dir) == root / "step_1"
    assert not (root / "step_2").exists()
    (partial,) = partial_dirs(root)  # the interrupted write, which nothing loads
    assert partial.name.startswith(".step_2.partial-")
    written = {p.name for p in partial.iterdir()}
    assert "__0_0.distcp" in written and ".complete" not in written
    assert ("trainer_state.json" in written) == (where == "rename")

    # resume into the same run directory: step_1 loads, the run continues exactly, and its first
    # save removes the partial write
    resumed = kdlib.run(kdlib.compose(tiny_overrides + STEPS + [f"train.resume={run_dir}", f"output_dir={run_dir}"]))
    rows = _rows(resumed.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]  # each step once: row 1 is the killed run's
    _assert_continues(reference, rows[1:], first_step=2)
    assert partial_dirs(root) == []
    assert [step for step, _ in complete_checkpoints(root)] == [2, 3]


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(tiny_overrides, reference, tmp_path, monkeypatch):
    """A patched write fails with ENOSPC at the second checkpoint, after the shards are written."""
    from kdlib.parallel import checkpoint as ckpt

    real_save, saves = ckpt.save_extra_state, []

    def full_disk_save(directory, rank, state):
        if rank == 0:
            saves.append(directory)
            if len(saves) == 2:
                path = Path(directory) / "extra_rank0.json"
                path.write_bytes(b"\0" * 1000)  # a few bytes made it before the disk filled up
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return real_save(directory, rank, state)

    monkeypatch.setattr(ckpt, "save_extra_state", full_disk_save)
    run_dir = tmp_path / "full"
    with pytest.raises(CheckpointError) as caught:
        kdlib.run(kdlib.compose(tiny_overrides + STEPS + [f"output_dir={run_dir}"]))
    root = run_dir / "checkpoints"
    assert str(caught.value) == (
        f"cannot write checkpoint {root / 'step_2'}: No space left on device [ENOSPC] (free some space, or "
        f"lower train.keep_checkpoints); the previous checkpoint {root / 'step_1'} is intact"
    )
    assert partial_dirs(root) == [] and [s for s, _ in complete_checkpoints(root)] == [1]
    monkeypatch.setattr(ckpt, "save_extra_state", real_save)
    resumed = kdlib.run(kdlib.compose(tiny_overrides + STEPS + [f"train.resume={run_dir}", f"output_dir={tmp_path / 'resumed'}"]))
    _assert_continues(reference, _rows(resumed.run_dir), first_step=2)


def _can_mount_tmpfs(tmp_path: Path) -> bool:
    probe = tmp_path / "probe"
    probe.mkdir()
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                          f"mount -t tmpfs -o size=64k tmpfs {probe}"], capture_output=True)
    return out.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_stops_the_cli_run_with_one_line(tiny_overrides, reference, tmp_path):
    """The CLI run's checkpoint directory is a 2.5 MB tmpfs: step_1 (1.7 MB) fits, step_2 does not."""
    if shutil.which("unshare") is None or not _can_mount_tmpfs(tmp_path):
        pytest.skip("needs unshare and a mount namespace for a private tmpfs")
    run_dir, copy = tmp_path / "cli", tmp_path / "checkpoints_copy"
    root = run_dir / "checkpoints"
    root.mkdir(parents=True)
    args = [o for o in tiny_overrides if not o.startswith("output_dir=")] + STEPS + [f"hydra.run.dir={run_dir}"]
    kdlib_command = " ".join([sys.executable, "-m", "kdlib", *[f"'{a}'" for a in args]])
    script = (f"mount -t tmpfs -o size=2560k tmpfs {root} && {{ {kdlib_command}; echo $? > {tmp_path / 'rc'}; }}; "
              f"cp -a {root} {copy}")  # the tmpfs goes away with the namespace: keep what it held
    out = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert (tmp_path / "rc").read_text().strip() == "2", out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("kdlib: error:")]
    assert errors == [
        f"kdlib: error: cannot write checkpoint {root / 'step_2'}: No space left on device [ENOSPC] (free some "
        f"space, or lower train.keep_checkpoints); the previous checkpoint {root / 'step_1'} is intact"
    ], out.stderr
    assert "Traceback" not in out.stderr
    assert partial_dirs(copy) == [] and [s for s, _ in complete_checkpoints(copy)] == [1]
    resumed = kdlib.run(kdlib.compose(tiny_overrides + STEPS + [f"train.resume={copy / 'step_1'}", f"output_dir={tmp_path / 'resumed'}"]))
    _assert_continues(reference, _rows(resumed.run_dir), first_step=2)


def test_a_final_save_that_fails_keeps_the_weights_and_says_how_to_retry(tiny_overrides, tmp_path, monkeypatch):
    """The student cannot be saved at the end (safetensors reports the full disk with its own
    error, not an OSError): the trained weights are kept as a checkpoint, the run ends in one line
    that says how to save them, and that command saves the student the uninterrupted run saves."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    run_dir = tmp_path / "run"
    steps = ["train.max_steps=3", "eval.before=false", "train.checkpoint_minutes=0"]  # no checkpoint on the way
    real_save = PreTrainedModel.save_pretrained

    def full_disk(self, *args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    with pytest.raises(CheckpointError) as caught:
        kdlib.run(kdlib.compose(tiny_overrides + steps + [f"output_dir={run_dir}"]))
    message = str(caught.value)
    assert "\n" not in message and message.startswith(f"cannot save the student to {run_dir / 'student'}: ")
    assert "(free some space, or lower train.keep_checkpoints)" in message
    checkpoint = run_dir / "checkpoints" / "step_3"
    assert f"the trained weights were saved as checkpoint {checkpoint}" in message
    assert message.endswith(f"run the same command with train.resume={run_dir}: it saves the student without training again")
    assert not list(run_dir.glob(".student.partial-*"))  # nothing half-written is left behind
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", real_save)
    retried = kdlib.run(kdlib.compose(tiny_overrides + steps + [f"output_dir={run_dir}", f"train.resume={run_dir}"]))
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3]  # nothing trained again
    uninterrupted = kdlib.run(kdlib.compose(tiny_overrides + steps + [f"output_dir={tmp_path / 'reference'}"]))
    from safetensors.torch import load_file

    a = load_file(retried.student_dir / "model.safetensors")
    b = load_file(uninterrupted.student_dir / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
