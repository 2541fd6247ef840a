"""Off-policy runs with the teacher behind a loopback /v1/completions server (teacher/backend=served).

A run through kdlib.run ends and saves with the served teacher, learning what the hf teacher's
top-k signal teaches; a server that dies mid-run ends the run with one line naming the server and a
checkpoint of the last finished step, which resumes.
"""

from __future__ import annotations

import json

import pytest

import kdlib
from kdlib.errors import TeacherUnavailable
from served_double import LoopbackServer

SIGNAL = ["teacher.signal.kind=topk", "teacher.signal.k=8"]


def _losses(result) -> list[float]:
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows]


def test_a_served_teacher_run_ends_and_saves_and_learns_what_the_hf_teacher_teaches(tiny_overrides, tiny_llama, tmp_path,
                                                                                    monkeypatch):
    monkeypatch.setenv("KDLIB_TEST_SERVED_KEY", "sk-run-secret-77")
    reference = kdlib.run(kdlib.compose(tiny_overrides + SIGNAL + ["transport.dtype=float32", "eval.before=false",
                                                                   f"output_dir={tmp_path / 'hf'}"]))
    with LoopbackServer(tiny_llama, token_keys="ids", api_key="sk-run-secret-77") as server:
        cfg = kdlib.compose(tiny_overrides + SIGNAL + [
            "teacher/backend=served", f"teacher.backend.url={server.url}", "teacher.backend.batch_size=2",
            "teacher.backend.api_key_env=KDLIB_TEST_SERVED_KEY", "eval.before=false", f"output_dir={tmp_path / 'served'}",
        ])
        result = kdlib.run(cfg)
        assert server.requests and all(r["path"] == "/v1/completions" for r in server.requests)
    assert (result.student_dir / "model.safetensors").exists() and (result.student_dir / "config.json").exists()
    assert _losses(result) == pytest.approx(_losses(reference), rel=1e-4)
    assert result.eval_after["signal_kl"] == pytest.approx(reference.eval_after["signal_kl"], rel=1e-4)
    written = "".join(p.read_text(errors="ignore") for p in result.run_dir.rglob("*") if p.is_file() and p.suffix in
                      (".yaml", ".json", ".jsonl", ".log", ".txt", ".md"))
    assert "KDLIB_TEST_SERVED_KEY" in (result.run_dir / "config.yaml").read_text()
    assert "sk-run-secret-77" not in written


def test_a_server_that_dies_mid_run_stops_it_with_one_line_and_a_checkpoint(tiny_overrides, tiny_llama, tmp_path):
    """Each step asks the server twice (2 micro-batches of 4 samples, batch_size=4): it dies on
    the fifth request, in step 3, after step 2 finished. The run stops (no hang: a refused
    connection, retried twice) naming the server and the checkpoint of step 2, which resumes."""
    with LoopbackServer(tiny_llama, die_after=4) as server:
        overrides = tiny_overrides + SIGNAL + [
            "teacher/backend=served", f"teacher.backend.url={server.url}", "teacher.backend.token_keys=text",
            "teacher.backend.batch_size=4", "teacher.backend.retries=2", "teacher.backend.backoff_s=0.01",
            "train.max_steps=4", "eval.before=false", "pipeline.prefetch=0",
        ]
        with pytest.raises(TeacherUnavailable) as info:
            kdlib.run(kdlib.compose(overrides))
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"teacher server {server.url}/v1/completions: ") and "after 3 attempts" in message
    run_dir = tmp_path / "run"
    assert f"checkpoint {run_dir / 'checkpoints' / 'step_2'}" in message
    assert f"train.resume={run_dir}" in message
    assert (run_dir / "checkpoints" / "step_2").is_dir()
    with LoopbackServer(tiny_llama) as again:  # the server is back (on another port)
        resumed = kdlib.run(kdlib.compose([o for o in overrides if "backend.url" not in o] + [
            f"teacher.backend.url={again.url}", f"train.resume={run_dir}",
        ]))
    assert [json.loads(line)["step"] for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()][-1] == 4
