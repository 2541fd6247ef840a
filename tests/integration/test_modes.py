"""Every value of ``mode`` runs end to end on tiny models, as a user would select it."""

from __future__ import annotations

import json

import pytest

import kdlib
from kdlib.config import Mode

MODE_OVERRIDES = {
    Mode.offpolicy: [],
    Mode.sft: [],  # no algorithm given: SFT replaces the default vanilla KD
    Mode.onpolicy: ["rollout.max_new_tokens=8", "train.global_batch_size=4", "train.micro_batch_size=2"],
    Mode.generate: ["rollout.max_new_tokens=8", "data.max_samples=3", "generate.drop_truncated=false"],
    Mode.cache: [],  # teacher.cache is added below (a per-test directory)
}


@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_every_mode_runs(mode, tiny_overrides, tmp_path):
    assert set(MODE_OVERRIDES) == set(Mode), "a new mode needs a case here"
    extra = [f"teacher.cache={tmp_path / 'cache'}"] if mode is Mode.cache else []
    cfg = kdlib.compose(tiny_overrides + [f"mode={mode.value}", "train.max_steps=2", "eval.before=false"]
                        + MODE_OVERRIDES[mode] + extra)
    result = kdlib.run(cfg)
    if mode is Mode.cache:
        assert result.metrics["samples"] == 24 + 8 and result.metrics["tokens"] > 0
        assert (tmp_path / "cache" / "manifest.json").exists()
        return
    if mode is Mode.generate:
        lines = result.outputs["generated"].read_text().splitlines()
        assert len(lines) == 3 and all(json.loads(line)["messages"][-1]["role"] == "assistant" for line in lines)
        return
    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    if mode is Mode.sft:
        assert cfg.algorithm.name == "sft" and "mode=sft" in cfg.auto_choices["algorithm"]
        assert all(r["kd_loss"] == 0.0 and r["loss"] == pytest.approx(r["ce_loss"], rel=1e-6) for r in rows)
        assert set(result.eval_after) == {"ce", "bits_per_byte", "ece", "tokens"}
    else:  # the logged loss is the objective made of the logged terms: (1 - kd_ratio) CE + kd_ratio KD
        ratio = cfg.algorithm.kd_ratio
        for r in rows:
            assert r["kd_loss"] > 0 and r["ce_loss"] > 0
            assert r["loss"] == pytest.approx(ratio * r["kd_loss"] + (1 - ratio) * r["ce_loss"], rel=1e-6)
        assert result.eval_after["kl"] > 0 and result.eval_after["tokens"] > 0


def test_sft_mode_refuses_an_algorithm_that_needs_a_teacher(tiny_overrides, monkeypatch):
    from kdlib.algorithms import ALGORITHMS, Algorithm, register_algorithm
    from kdlib.errors import ConfigError

    monkeypatch.setattr(ALGORITHMS, "_entries", dict(ALGORITHMS._entries))  # registered for this test only

    @register_algorithm("needs_teacher_test")
    class NeedsTeacher(Algorithm):  # noqa: D401 - a throwaway entry
        def compute_loss(self, *args):
            raise AssertionError("never runs")

    with pytest.raises(ConfigError, match="mode=sft trains without a teacher, but algorithm=needs_teacher_test"):
        kdlib.compose(tiny_overrides + ["mode=sft", "algorithm=needs_teacher_test"])
