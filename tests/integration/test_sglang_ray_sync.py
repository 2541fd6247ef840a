"""rollout.weight_sync=distributed through real Ray actors: 2 FSDP2 student ranks gather
the weights, rank 0 broadcasts them (gloo) into an SGLang engine double living in the rollout
actor; the run equals the local run whose weights travel as transport buckets."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def _rows(result, name):
    return [json.loads(line) for line in (result.run_dir / name).read_text().splitlines()]


def test_broadcast_sync_through_ray_equals_the_local_transport_sync(tiny_overrides, tmp_path, monkeypatch):
    import ray

    tests = Path(__file__).resolve().parents[1]
    # the engine double, for this process and the Ray workers (installed by Ray's setup hook in each)
    import engine_double
    from kdlib.backends.sglang.engine import SGLangEngine

    monkeypatch.setattr(SGLangEngine, "factory", engine_double.EngineDouble)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tests), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    common = tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.max_steps=3",
        "rollout.max_new_tokens=12", "rollout.temperature=0", "eval.before=false", "rollout=sglang",
    ]
    local = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'local'}"]))
    calls = tmp_path / "engine_calls.txt"
    monkeypatch.setenv("ENGINE_DOUBLE_LOG", str(calls))
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False,
             runtime_env={"worker_process_setup_hook": "engine_double.install"})
    try:
        broadcast = kdlib.run(kdlib.compose(common + [
            "launcher=ray", "transport=ray", "student.num_workers=2", "rollout.weight_sync=distributed",
            f"output_dir={tmp_path / 'ray'}",
        ]))
    finally:
        ray.shutdown()
    a, b = _rows(local, "metrics.jsonl"), _rows(broadcast, "metrics.jsonl")
    assert len(a) == len(b) == 3 and b[0]["loss"] > b[2]["loss"]
    for x, y in zip(a, b, strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-4)
    # the samples of steps 2 and 3 come from the synced weights: the same responses
    assert [r["response"] for r in _rows(broadcast, "rollouts.jsonl")] == [r["response"] for r in _rows(local, "rollouts.jsonl")]
    # ... and they arrived by broadcast: one group, then per sync one session of received buckets
    names = [line.split()[1] for line in calls.read_text().splitlines()]
    assert names.count("init_weights_update_group") == 1 and "update_weights_from_tensor" not in names
    assert names.count("begin_weight_update") == 4  # the start and after each of 3 steps
    received = names.count("update_weights_from_distributed")  # buckets per sync x 4 syncs
    assert received >= 4 and received % 4 == 0
