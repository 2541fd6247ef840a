"""SIGTERM or Ctrl-C (SIGINT) sent to a real ``kdlib`` process in the middle of training.

The run finishes its step, writes a checkpoint, exits with 128 + the signal number and prints the
exact command that resumes; that command, run as printed, continues to the same losses and the
same final student as a run that was never interrupted.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import kdlib

TESTS = Path(__file__).resolve().parents[1]  # fault_plugins.py lives here


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **extra)


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _interrupt(sig: signal.Signals, overrides: list[str], run_dir: Path, cwd: Path) -> tuple[int, list[str], Path]:
    """Start ``kdlib overrides`` (each micro-batch sleeping 0.3 s in the plugin), send ``sig``
    once two steps are logged, check how it ends; (step it stopped at, resume command, checkpoint)."""
    process = subprocess.Popen([sys.executable, "-m", "kdlib", *overrides, f"hydra.run.dir={run_dir}"], cwd=cwd,
                               env=_env(KDLIB_TEST_STEP_SECONDS="0.3"), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while len(_rows(run_dir)) < 2:
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "training never started"
            time.sleep(0.05)
        process.send_signal(sig)
        _, stderr = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + sig, stderr

    stopped_at = len(_rows(run_dir))  # the step in flight was finished, not thrown away
    assert 2 <= stopped_at < 8
    errors = [line for line in stderr.splitlines() if line.startswith("kdlib: error:")]
    assert len(errors) == 1 and "Traceback" not in stderr, stderr
    checkpoint = run_dir / "checkpoints" / f"step_{stopped_at}"
    expected = f"kdlib: error: interrupted by {sig.name} after step {stopped_at}/8; checkpoint {checkpoint}; resume with: kdlib "
    assert errors[0].startswith(expected), errors[0]
    command = shlex.split(errors[0][len(expected) - len("kdlib "):])
    assert command[0] == "kdlib" and command[-2:] == [f"train.resume={run_dir}", f"hydra.run.dir={run_dir}"]
    assert (checkpoint / ".complete").exists()
    return stopped_at, command, checkpoint


def _assert_continues(reference_rows: list[dict], resumed_rows: list[dict], stopped_at: int, rel: float) -> None:
    """The resumed rows are the reference's from ``stopped_at + 1`` on (``rel=0``: bit for bit)."""
    expected_rows = reference_rows[stopped_at:]
    assert [r["step"] for r in resumed_rows] == [r["step"] for r in expected_rows] == list(range(stopped_at + 1, 9))
    for a, b in zip(expected_rows, resumed_rows, strict=True):
        for key in ("loss", "kd_loss", "ce_loss", "grad_norm", "lr"):
            assert (b[key] == a[key]) if rel == 0 else b[key] == pytest.approx(a[key], rel=rel), (b["step"], key)


PLUGIN = ["plugins=[fault_plugins]", "algorithm=fault_injection", "train.max_steps=8", "eval.before=false"]


_REFERENCE: dict[tuple, kdlib.RunResult] = {}


def _reference(overrides: list[str], output_dir: Path):
    """The uninterrupted run of ``overrides`` (run once per configuration in this module)."""
    key = tuple(overrides)
    if key not in _REFERENCE:
        _REFERENCE[key] = kdlib.run(kdlib.compose(list(overrides) + [f"output_dir={output_dir}"]))
    return _REFERENCE[key]


@pytest.mark.parametrize("sig", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
                         ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_after_the_step_with_a_checkpoint_and_the_resume_command(sig, tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("output_dir=")] + PLUGIN
    run_dir = tmp_path / "interrupted"
    stopped_at, command, _ = _interrupt(sig, overrides, run_dir, tmp_path)

    # the printed command, exactly as printed: it continues in the same run directory
    subprocess.run([sys.executable, "-m", "kdlib", *command[1:]], cwd=tmp_path, env=_env(), check=True,
                   capture_output=True, timeout=600)

    reference = _reference(overrides, tmp_path / "reference")
    rows = _rows(run_dir)  # each step once: the interrupted run's steps, then the resumed ones
    _assert_continues(_rows(reference.run_dir), rows, 0, rel=0)

    from safetensors.torch import load_file

    final, uninterrupted = load_file(run_dir / "student" / "model.safetensors"), load_file(reference.student_dir / "model.safetensors")
    assert final.keys() == uninterrupted.keys()
    for name in final:
        assert torch.equal(final[name], uninterrupted[name]), name


@pytest.mark.ray
@pytest.mark.slow
def test_sigterm_to_a_ray_run_checkpoints_every_rank(tiny_overrides, tmp_path):
    """The driver of a Ray run (2 FSDP2 student actors) takes the signal: every rank writes its
    shards, Ray shuts down, and the checkpoint resumes on one local worker as the run continues."""
    local = [o for o in tiny_overrides if not o.startswith("output_dir=")] + PLUGIN
    overrides = local + ["+recipe=ray", "student.num_workers=2", "launcher.num_cpus=2"]
    stopped_at, command, checkpoint = _interrupt(signal.SIGTERM, overrides, tmp_path / "ray", tmp_path)
    assert "+recipe=ray" in command
    assert {p.name for p in checkpoint.glob("extra_rank*.json")} == {"extra_rank0.json", "extra_rank1.json"}
    resumed = kdlib.run(kdlib.compose(local + [f"train.resume={tmp_path / 'ray'}", f"output_dir={tmp_path / 'resumed'}"]))
    reference = _reference(local, tmp_path / "reference")
    _assert_continues(_rows(reference.run_dir), _rows(resumed.run_dir), stopped_at, rel=1e-4)  # Ray == local to 1e-4


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_without_a_checkpoint(tiny_overrides, tmp_path):
    overrides = [o for o in tiny_overrides if not o.startswith("output_dir=")] + PLUGIN
    run_dir = tmp_path / "twice"
    process = subprocess.Popen([sys.executable, "-m", "kdlib", *overrides, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                               env=_env(KDLIB_TEST_STEP_SECONDS="0.3"), stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)  # log lines (stdout) and errors, in order
    try:
        deadline = time.monotonic() + 300
        while len(_rows(run_dir)) < 1:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        seen = []
        for line in process.stdout:  # wait until the first one was taken as a request
            seen.append(line)
            if "received SIGINT" in line:
                break
        process.send_signal(signal.SIGINT)
        stderr = "".join(seen) + process.stdout.read()
        process.wait(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert [line for line in stderr.splitlines() if line.startswith("kdlib: error:")] == [
        "kdlib: error: interrupted by SIGINT; no checkpoint written"
    ]
    assert "Traceback" not in stderr and not (run_dir / "checkpoints").exists()
