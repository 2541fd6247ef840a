"""3-step on-policy runs, local and on Ray (2 FSDP2 students, a rollout actor, a teacher actor)."""

from __future__ import annotations

import json

import pytest

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl


def _onpolicy(tiny_overrides, tmp_path, extra=()):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    # greedy rollouts of a fixed prompt set: the samples move with the student, the loss falls
    return kdlib.compose(tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.epochs=3",
        "train.max_steps=3", "rollout.max_new_tokens=12", "rollout.temperature=0", "train.warmup_ratio=0",
        "eval.before=true", *extra,
    ])


def _rows(result):
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def test_local_onpolicy_run(tiny_overrides, tmp_path):
    result = kdlib.run(_onpolicy(tiny_overrides, tmp_path, [f"output_dir={tmp_path / 'local'}"]))
    losses = [r["loss"] for r in _rows(result)]
    assert len(losses) == 3 and losses[0] > losses[1] > losses[2]
    assert all(r["on_policy"] == 1.0 and r["sync_seconds"] > 0 for r in _rows(result))
    rollouts = [json.loads(line) for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 12 and {r["step"] for r in rollouts} == {1, 2, 3}
    assert all(r["finish_reason"] in {"stop", "length"} and r["response_tokens"] <= 12 for r in rollouts)
    assert result.student_dir is not None


def test_every_sync_gives_the_rollout_engine_the_students_weights(tiny_overrides, tmp_path):
    """After each step's weight sync, the engine's model holds exactly the student's weights (and
    they did change: the check could fail)."""
    import torch

    from kdlib.runner import built

    with built(_onpolicy(tiny_overrides, tmp_path), run_dir=tmp_path / "sync") as loop:
        student = loop.pipeline.students.group.workers[0]
        engine = loop.pipeline.rollout.group.workers[0].backend.model
        loop.start(1)
        batches = loop.sample_batches()
        before = {k: v.clone() for k, v in engine.state_dict().items()}
        for step in (1, 2):
            loop.step(next(batches), step)
            expected = student.export_state()
            got = engine.state_dict()
            assert set(expected) <= set(got)
            assert all(torch.equal(got[k], expected[k].to(got[k].dtype)) for k in expected)
        assert any(not torch.equal(before[k], engine.state_dict()[k]) for k in before)


@pytest.mark.ray
def test_ray_onpolicy_run_matches_local(tiny_overrides, tmp_path):
    import os

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    local = kdlib.run(_onpolicy(tiny_overrides, tmp_path, [f"output_dir={tmp_path / 'local'}"]))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        on_ray = kdlib.run(_onpolicy(tiny_overrides, tmp_path, [
            "launcher=ray", "transport=ray", "student.num_workers=2", f"output_dir={tmp_path / 'ray'}",
        ]))
    finally:
        ray.shutdown()
    a, b = _rows(local), _rows(on_ray)
    assert b[0]["loss"] > b[1]["loss"] > b[2]["loss"]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
