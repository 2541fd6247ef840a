"""Whole runs with the SGLang backends, the engine double standing in for sglang.Engine on the CPU:
the same losses as the transformers backends, off-policy (also colocated) and on-policy."""

from __future__ import annotations

import json

import pytest

import kdlib
from engine_double import EngineDouble
from kdlib.demo.text import chat_rows, write_jsonl


@pytest.fixture
def double(monkeypatch, tmp_path):
    import kdlib.backends.sglang.engine

    monkeypatch.setattr(kdlib.backends.sglang.engine.SGLangEngine, "factory", EngineDouble)
    monkeypatch.setattr(EngineDouble, "instances", [])
    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))  # the pruned student written for the engine
    return EngineDouble


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _same_losses(a, b, rel=1e-5):
    assert len(a) == len(b) == 3
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "kd_loss", "ce_loss"):
            assert y[key] == pytest.approx(x[key], rel=rel), key


def test_offpolicy_with_the_sglang_teacher_equals_the_hf_teacher(double, tiny_overrides, tmp_path):
    common = tiny_overrides + ["train.packing=true"]
    hf = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'hf'}"]))
    sglang = kdlib.run(kdlib.compose(common + ["teacher/backend=sglang", f"output_dir={tmp_path / 'sglang'}"]))
    _same_losses(_rows(hf), _rows(sglang))
    assert sglang.eval_after["kl"] == pytest.approx(hf.eval_after["kl"], rel=1e-5)
    (engine,) = double.instances
    assert engine.server_args["enable_memory_saver"] is False  # nothing to release without colocation


def test_colocated_sglang_teacher_releases_between_phases(double, tiny_overrides, tmp_path):
    base = tiny_overrides + ["eval.before=false", "data.eval=null"]
    plain = kdlib.run(kdlib.compose(base + ["teacher/backend=sglang", f"output_dir={tmp_path / 'a'}"]))
    colocated = kdlib.run(kdlib.compose(base + ["teacher/backend=sglang", "pipeline.colocate=true",
                                                f"output_dir={tmp_path / 'b'}"]))
    _same_losses(_rows(plain), _rows(colocated), rel=0)
    engine = double.instances[-1]
    memory = [(name, tags) for name, tags in engine.calls_named("release_memory_occupation", "resume_memory_occupation")]
    tags = ["kv_cache", "weights", "cuda_graph"]
    # scored awake, released for the students, resumed for the next step's teacher phase
    assert memory == [("release_memory_occupation", tags), ("resume_memory_occupation", tags)] * 2 + [
        ("release_memory_occupation", tags)]
    assert engine.server_args["enable_weights_cpu_backup"] is True


def test_onpolicy_with_sglang_teacher_and_rollout_equals_hf(double, tiny_overrides, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    common = tiny_overrides + [
        "+recipe=onpolicy", "loss=kl", f"data.train={prompts}", "train.global_batch_size=4", "train.max_steps=3",
        "rollout.max_new_tokens=12", "rollout.temperature=0", "rollout.n_samples_per_prompt=2", "eval.before=false",
    ]
    hf = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'hf'}"]))
    sglang = kdlib.run(kdlib.compose(common + ["teacher/backend=sglang", "rollout=sglang", "rollout.release_memory=true",
                                               f"output_dir={tmp_path / 'sglang'}"]))
    _same_losses(_rows(hf), _rows(sglang))

    def responses(result):
        return [json.loads(line)["response_tokens"] for line in (result.run_dir / "rollouts.jsonl").read_text().splitlines()]

    assert responses(sglang) == responses(hf) and len(responses(hf)) == 12
    rollout = next(e for e in double.instances if not e.server_args.get("enable_return_hidden_states"))
    names = [name for name, _ in rollout.calls if name != "update_weights_from_tensor"]
    # start: sync the (possibly resumed) student, then per step generate -> release -> train -> sync
    assert names[:4] == ["begin_weight_update", "end_weight_update", "flush_cache", "generate"]
    assert names.count("generate") == 3 and names.count("flush_cache") == 3
