"""Tiny end-to-end runs through kdlib.run with the local launcher."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import kdlib
from kdlib.demo.text import chat_rows, write_jsonl


@pytest.fixture
def repeat_data(tmp_path):
    """8 rows and a global batch of 8: every step sees the same batch, so the loss must fall."""
    return write_jsonl(tmp_path / "train8.jsonl", chat_rows(8, seed=3))


@pytest.mark.parametrize("teacher_fixture, student_fixture", [("tiny_llama", "tiny_llama"), ("tiny_qwen3", "tiny_qwen3")])
def test_three_step_offpolicy_run(teacher_fixture, student_fixture, repeat_data, tiny_overrides, tmp_path, request):
    teacher = request.getfixturevalue(teacher_fixture)
    cfg = kdlib.compose(tiny_overrides + [
        f"teacher.model={teacher}", f"student.model={request.getfixturevalue(student_fixture)}",
        f"data.train={repeat_data}", "train.global_batch_size=8", "train.micro_batch_size=4",
        "train.epochs=3", "train.max_steps=3", "train.warmup_ratio=0", "train.lr=3e-3",
    ])
    result = kdlib.run(cfg)

    rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    losses = [r["loss"] for r in rows]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[0] > losses[1] > losses[2]
    for key in ("kd_loss", "ce_loss", "lr", "grad_norm", "tokens_per_s"):
        assert all(key in r and r[key] == r[key] for r in rows), key
    assert result.eval_after["kl"] < result.eval_before["kl"]
    assert result.eval_after["bits_per_byte"] < result.eval_before["bits_per_byte"]  # same tokenizer too
    assert result.eval_after["teacher_bits_per_byte"] == result.eval_before["teacher_bits_per_byte"]

    # the run directory holds what users look for
    for name in ("config.yaml", "metrics.jsonl", "eval.json", "results.json", "data_report.json", "plots/loss.png", "kdlib.log"):
        assert (result.run_dir / name).exists(), name
    assert "held-out evaluation" in (result.run_dir / "eval.txt").read_text()

    # the final student reloads in Hugging Face format, pruned to 2 layers, with its tokenizer
    student = AutoModelForCausalLM.from_pretrained(result.student_dir)
    tokenizer = AutoTokenizer.from_pretrained(result.student_dir)
    assert student.config.num_hidden_layers == 2
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "hello"}], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert torch.isfinite(student(**ids).logits).all()
    initial = AutoModelForCausalLM.from_pretrained(teacher)
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    # a tied head (Qwen3 here) is one tensor: saved once, under the embeddings' name, and tied on load
    from safetensors import safe_open

    with safe_open(str(result.student_dir / "model.safetensors"), "pt") as saved:
        keys = set(saved.keys())
    tied = student.config.tie_word_embeddings
    assert ("lm_head.weight" in keys) is not tied and "model.embed_tokens.weight" in keys
    assert (student.get_output_embeddings().weight is student.get_input_embeddings().weight) is tied


def test_sft_runs_without_a_teacher(tiny_overrides):
    from kdlib.runner import built

    cfg = kdlib.compose(tiny_overrides + ["+recipe=sft", "teacher.model=/nonexistent/teacher"])
    with built(cfg, run_dir=None) as loop:
        assert loop.pipeline.teacher is None
    result = kdlib.run(cfg)
    assert result.metrics["kd_loss"] == 0.0 and result.metrics["ce_loss"] > 0
    assert set(result.eval_after) == {"ce", "bits_per_byte", "ece", "tokens"}  # nothing about a teacher


def test_same_seed_same_run(tiny_overrides, tmp_path):
    losses = []
    for name in ("a", "b"):
        cfg = kdlib.compose(tiny_overrides + [f"output_dir={tmp_path / name}", "eval.before=false"])
        losses.append(kdlib.run(cfg).metrics["loss"])
    assert losses[0] == losses[1]


def test_resume_from_a_checkpoint_continues_the_same_run(tiny_overrides, tmp_path):
    """Model, optimizer, schedule, RNG and data position: resumed steps equal uninterrupted ones."""
    common = tiny_overrides + ["train.max_steps=3", "eval.before=false", "train.checkpoint_every=1", "train.keep_checkpoints=5"]
    full = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'full'}"]))
    checkpoints = sorted(p.name for p in (full.run_dir / "checkpoints").iterdir())
    assert checkpoints == ["step_1", "step_2", "step_3"]
    resumed = kdlib.run(kdlib.compose(common + [
        f"train.resume={full.run_dir / 'checkpoints' / 'step_1'}", f"output_dir={tmp_path / 'resumed'}",
    ]))
    rows_full = [json.loads(line) for line in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    rows_resumed = [json.loads(line) for line in (resumed.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows_resumed] == [2, 3]
    for a, b in zip(rows_full[1:], rows_resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)


def test_colocation_and_dynamic_batches_do_not_change_the_objective(tiny_overrides, tmp_path):
    """On the CPU sleep/wake move nothing: colocation is bit for bit the plain run. A token budget
    and packing regroup the micro-batches only: every step's loss and the final student agree to
    float32 round-off (other padding shapes)."""
    from safetensors.torch import load_file

    base = tiny_overrides + ["train.max_steps=3", "eval.before=false", "loss.implementation=naive"]
    plain = kdlib.run(kdlib.compose(base + [f"output_dir={tmp_path / 'plain'}"]))
    variants = {
        "colocate": ["pipeline.colocate=true"],
        "budget": ["train.max_tokens_per_micro_batch=160"],
        "packed": ["train.max_tokens_per_micro_batch=200", "train.packing=true"],
    }
    rows = [json.loads(line) for line in (plain.run_dir / "metrics.jsonl").read_text().splitlines()]
    weights = load_file(plain.student_dir / "model.safetensors")
    for name, extra in variants.items():
        result = kdlib.run(kdlib.compose(base + extra + [f"output_dir={tmp_path / name}"]))
        variant_rows = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
        variant_weights = load_file(result.student_dir / "model.safetensors")
        assert [r["step"] for r in variant_rows] == [r["step"] for r in rows] == [1, 2, 3], name
        for a, b in zip(rows, variant_rows, strict=True):
            assert b["loss_tokens"] == a["loss_tokens"] and b["samples"] == a["samples"], name
            if name == "colocate":
                assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"], name
            else:
                assert b["loss"] == pytest.approx(a["loss"], rel=1e-5), (name, a["step"])
                assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-4), (name, a["step"])
                assert b["micro_batches"] > a["micro_batches"], name  # regrouped (2 micro-batches of 4 before)
        assert variant_weights.keys() == weights.keys()
        if name == "colocate":
            assert all(torch.equal(variant_weights[k], v) for k, v in weights.items()), name
            continue
        # Adam moves an element by up to lr (1e-3) per step whatever the size of its gradient, so an
        # element whose gradient is at round-off level may end up to 3 steps x lr apart; all others agree
        diff = torch.cat([(variant_weights[k] - v).abs().flatten() for k, v in weights.items()])
        assert float(diff.max()) < 3e-3 and float((diff > 1e-5).float().mean()) < 1e-3, name


def test_an_explicit_max_steps_cycles_epochs(tiny_overrides, tmp_path):
    """24 samples, 8 per step: 3 steps per epoch; max_steps=7 runs 7 steps (as transformers'
    Trainer does), each epoch a new seeded order covering every sample once."""
    from kdlib.runner import built

    cfg = kdlib.compose(tiny_overrides + ["train.max_steps=7", "train.epochs=1", "eval.before=false"])
    with built(cfg, run_dir=tmp_path / "probe") as loop:
        assert loop.pipeline.total_steps == 7
        stream = loop.sample_batches()
        steps = [[s.index for s in next(stream)] for _ in range(7)]
    epoch1, epoch2 = steps[0:3], steps[3:6]
    assert sorted(i for b in epoch1 for i in b) == list(range(24)) == sorted(i for b in epoch2 for i in b)
    assert epoch1 != epoch2  # reshuffled
    result = kdlib.run(cfg)
    assert [r["step"] for r in (json.loads(x) for x in (result.run_dir / "metrics.jsonl").read_text().splitlines())] == list(range(1, 8))
