"""The log says each thing once, and nothing about parts a run does not use: one run per mode."""

from __future__ import annotations

import pytest

import kdlib

MODES = {
    "offpolicy": [],
    "onpolicy": ["+recipe=onpolicy", "rollout.max_new_tokens=8", "rollout.engine=generate"],
    "self_distill": ["+recipe=self_distill", "rollout.max_new_tokens=8", "rollout.engine=generate"],
    "sft": ["+recipe=sft"],
    "cache": ["+recipe=cache_teacher"],
    "generate": ["+recipe=generate", "rollout.max_new_tokens=8"],
}


@pytest.mark.parametrize("mode", list(MODES))
def test_each_log_line_once(mode, tiny_overrides, tmp_path):
    extra = MODES[mode] + [f"teacher.cache={tmp_path / 'cache'}"] * (mode == "cache")
    run = kdlib.run(kdlib.compose(tiny_overrides + ["train.max_steps=1"] + extra))
    lines = (run.run_dir / "kdlib.log").read_text(encoding="utf-8").splitlines()
    # progress lines repeat by design (a phase's count, "evaluating done" before and after)
    said = [line.split(" - ", 1)[-1] for line in lines if "][kdlib.progress][" not in line]
    repeated = sorted({m for m in said if said.count(m) > 1})
    assert not repeated, repeated
    if mode in ("sft",):
        assert not any(m.startswith("teacher.") for m in said), "a teacher setting logged where no teacher loads"
    if mode in ("offpolicy", "sft", "cache"):
        assert not any(m.startswith("rollout.") for m in said), "a rollout setting logged where nothing samples"
    assert sum("kept decoder layers" in m or m.startswith("student.keep_layers") for m in said) <= 1
