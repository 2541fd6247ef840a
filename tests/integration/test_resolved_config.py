"""config.yaml is exactly what ran: every worker's config, in every mode, equals the saved one, and
the resolved config cannot change once it is written."""

from __future__ import annotations

import re

import pytest
from omegaconf import OmegaConf

import kdlib
from kdlib.config.compose import load_config
from kdlib.config.node import freeze, thawed
from kdlib.errors import FrozenConfigError
from kdlib.runner import built


def _yaml(node) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(thawed(node)), resolve=True)


def _assert_same(saved, used, what: str) -> None:
    assert _yaml(saved) == _yaml(used), f"{what}: config.yaml differs from what the worker was given"


MODES = {
    "offpolicy": [],
    "sft": ["+recipe=sft"],
    "onpolicy": ["+recipe=onpolicy", "rollout.max_new_tokens=4"],
    "self_distill": ["+recipe=self_distill", "rollout.max_new_tokens=4"],
    "generate": ["+recipe=generate", "rollout.max_new_tokens=4"],
}


@pytest.mark.parametrize("mode", list(MODES) + ["cache"])
def test_config_yaml_is_what_every_worker_used(mode, tiny_overrides, chat_data, tmp_path):
    """Every ``auto`` is settled before config.yaml is written (packing included), and each worker
    holds exactly the saved config's sections."""
    extra = MODES.get(mode, ["+recipe=cache_teacher", f"teacher.cache={tmp_path / 'cache'}"])
    overrides = [o for o in tiny_overrides if not o.startswith("train.packing=")] + extra  # packing: auto
    if mode == "generate":
        overrides.append(f"data.train={chat_data['train']}")
    run_dir = tmp_path / "run"
    with built(kdlib.compose(overrides), run_dir=run_dir) as loop:
        saved = load_config(run_dir / "config.yaml")
        unresolved = [line for line in _yaml(saved).splitlines() if re.search(r":\s*auto\s*$", line)]
        assert not unresolved, f"auto values reached config.yaml: {unresolved}"
        assert isinstance(saved.train.packing, bool)
        pipeline = loop.pipeline
        _assert_same(saved, pipeline.cfg, "the pipeline")
        if pipeline.students is not None:
            spec = pipeline.students.group.workers[0].spec
            for section in ("student", "algorithm", "loss", "train", "transport"):
                _assert_same(getattr(saved, section), getattr(spec, section), f"student worker: {section}")
            assert (spec.device, spec.seed) == (saved.device, saved.seed)
        if pipeline.teacher is not None:
            spec = pipeline.teacher.group.workers[0].spec
            _assert_same(saved.teacher, spec.teacher, "teacher worker: teacher")
            _assert_same(saved.transport, spec.transport, "teacher worker: transport")
            if saved.teacher.from_student:
                _assert_same(saved.student, spec.architecture, "teacher worker: the student's architecture")
        if pipeline.rollout is not None:
            spec = pipeline.rollout.group.workers[0].spec
            _assert_same(saved.rollout, spec.rollout, "rollout worker: rollout")
            model = saved.teacher if mode == "generate" else saved.student
            _assert_same(model, spec.model, "rollout worker: model")
    expected_roles = {
        "offpolicy": {"teacher", "students"}, "sft": {"students"}, "onpolicy": {"teacher", "students", "rollout"},
        "self_distill": {"teacher", "students", "rollout"}, "generate": {"rollout"}, "cache": {"teacher"},
    }[mode]
    assert {r for r in ("teacher", "students", "rollout") if getattr(pipeline, r) is not None} == expected_roles


def test_a_late_write_raises(tiny_overrides, tmp_path):
    """Once resolved and written, no part of the config can change: attributes, nested nodes,
    lists and dicts all refuse (FrozenConfigError, a one-line ConfigError)."""
    cfg = freeze(kdlib.compose(tiny_overrides))
    with pytest.raises(FrozenConfigError, match="frozen once resolved"):
        cfg.train.packing = True
    with pytest.raises(FrozenConfigError):
        cfg.teacher.backend.name = "other"
    with pytest.raises(FrozenConfigError):
        cfg.auto_choices["train.packing"] = "true: changed"
    with pytest.raises((FrozenConfigError, AttributeError, TypeError)):
        cfg.student.transforms.append("lora")
    # inside a run: the workers' configs are the frozen ones
    with built(kdlib.compose(tiny_overrides), run_dir=tmp_path / "run") as loop:
        worker = loop.pipeline.students.group.workers[0]
        with pytest.raises(FrozenConfigError):
            worker.spec.train.lr = 1.0
        with pytest.raises(FrozenConfigError):
            loop.cfg.loss.temperature = 2.0


def test_kdlib_run_leaves_the_callers_config_as_it_was(tiny_overrides):
    """kdlib.run resolves and freezes a copy: a notebook can change its config and run it again."""
    cfg = kdlib.compose([o for o in tiny_overrides if not o.startswith("train.packing=")] + ["train.max_steps=1",
                                                                                            "eval.before=false"])
    kdlib.run(cfg)
    assert cfg.train.packing == "auto"  # resolved in the run's copy, not here
    cfg.train.max_steps = 2  # still writable
