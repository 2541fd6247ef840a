"""GPU and cluster layout options checked at composition: Ray placement, colocation, SGLang GPUs, FlashAttention-2."""

from __future__ import annotations

import pytest

import kdlib
from kdlib.errors import ConfigError
from kdlib.launch.placement import RolePlacement, combined, describe, worker_bundle


def test_a_colocated_bundle_reserves_every_role_it_hosts():
    teacher = worker_bundle(RolePlacement(resources={"node_a": 1}), cpus=1, gpus=0.4)
    student = worker_bundle(RolePlacement(), cpus=2, gpus=0.4)
    rollout = worker_bundle(RolePlacement(), cpus=0.5, gpus=0.2)
    assert teacher == {"CPU": 1.0, "node_a": 1.0, "GPU": 0.4}
    total = combined(teacher, student, rollout)
    assert total == pytest.approx({"CPU": 3.5, "node_a": 1.0, "GPU": 1.0})
    assert "GPU" not in worker_bundle(RolePlacement(), cpus=1, gpus=0)


@pytest.mark.parametrize("override, message", [
    ("launcher.teacher.colocate_with=student", "choose a role started before teacher: none"),
    ("launcher.rollout.colocate_with=student", "choose a role started before rollout: teacher"),
    ("launcher.student.colocate_with=critic", "choose a role started before student: teacher, rollout"),
])
def test_colocation_must_name_an_earlier_role(override, message, tiny_llama):
    with pytest.raises(ConfigError, match=message):
        kdlib.compose([f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "launcher=ray", "device=cpu", override])


def test_colocation_cannot_chain(tiny_llama):
    with pytest.raises(ConfigError, match="which itself shares the bundles of teacher"):
        kdlib.compose([f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "launcher=ray", "device=cpu",
                       "launcher.rollout.colocate_with=teacher", "launcher.student.colocate_with=rollout"])


def test_sglang_engines_ask_for_their_tensor_parallel_gpus(tiny_llama, monkeypatch):
    base = [f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "launcher=ray", "teacher/backend=sglang"]
    monkeypatch.setattr("kdlib.hardware.resolve_device_type", lambda spec: "cuda")
    cfg = kdlib.compose(base + ["teacher.backend.tp_size=4", "device=cuda", "teacher.dtype=bfloat16",
                                "student.dtype=bfloat16", "student.autocast=false"])
    assert cfg.launcher.teacher.gpus_per_worker == 4.0
    assert cfg.auto_choices["launcher.teacher.gpus_per_worker"] == "4: teacher.backend.tp_size"
    with pytest.raises(ConfigError, match=r"gpus_per_worker=0.5 is fewer than teacher.backend.tp_size=2"):
        kdlib.compose(base + ["teacher.backend.tp_size=2", "launcher.teacher.gpus_per_worker=0.5", "device=cpu"])
    kdlib.compose(base + ["launcher.teacher.gpus_per_worker=0.4", "device=cpu"])  # tp 1 may share a GPU


def test_nodes_are_named_by_address_custom_resources_and_id():
    node = {"NodeID": "3f2a1c9b77", "NodeManagerAddress": "10.0.0.2",
            "Resources": {"CPU": 8.0, "GPU": 8.0, "memory": 1e9, "node:10.0.0.2": 1.0, "node_b": 64.0,
                          "accelerator_type:H20": 1.0}}
    assert describe(node) == "10.0.0.2 [node_b] (id 3f2a1c9b)"


def test_flash_attention_needs_cuda_and_bf16(tiny_llama, monkeypatch):
    base = [f"teacher.model={tiny_llama}", f"student.model={tiny_llama}", "student.attn_implementation=flash_attention_2"]
    with pytest.raises(ConfigError, match="flash_attention_2 needs device=cuda"):
        kdlib.compose(base + ["device=cpu"])
    monkeypatch.setattr("kdlib.hardware.resolve_device_type", lambda spec: "cuda")
    with pytest.raises(ConfigError, match="computes in bf16 only: set student.dtype=bfloat16 or student.autocast=true"):
        kdlib.compose(base + ["device=cuda", "student.dtype=float32", "student.autocast=false", "teacher.dtype=float32"])
    cfg = kdlib.compose(base + ["device=cuda", "student.autocast=true", "teacher.dtype=bfloat16"])
    assert cfg.student.attn_implementation == "flash_attention_2"
