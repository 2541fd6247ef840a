"""LoRA students end to end: same first step as full fine-tuning, merged weights to the rollout
engine and a self-distillation teacher, saved outputs that load, exact resume, packing."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import kdlib
from kdlib.runner import built
from kdlib.demo.text import chat_rows, write_jsonl

pytest.importorskip("peft")

LORA = ["student.lora.r=4", "student.lora.alpha=8"]


def _rows(result) -> list[dict]:
    return [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]


def _initial_student(overrides):
    """The pruned student as loaded, before any transform (the base LoRA must leave untouched)."""
    from kdlib.models.student import build_model

    return build_model(kdlib.compose(overrides).student, torch.device("cpu"))


def test_lora_starts_like_full_finetuning_and_its_outputs_load(tiny_overrides, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    common = tiny_overrides + ["eval.before=false", "train.lr=1e-2"]
    full = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'full'}"]))
    lora = kdlib.run(kdlib.compose(common + LORA + [f"output_dir={tmp_path / 'lora'}"]))
    full_rows, lora_rows = _rows(full), _rows(lora)
    # B = 0 at the start: the first forward pass, hence the first loss, is the plain model's
    assert lora_rows[0]["loss"] == full_rows[0]["loss"]
    assert lora_rows[0]["kd_loss"] == full_rows[0]["kd_loss"] and lora_rows[0]["ce_loss"] == full_rows[0]["ce_loss"]
    assert lora_rows[2]["loss"] != full_rows[2]["loss"]  # then they train different parameters
    assert lora_rows[2]["loss"] < lora_rows[0]["loss"]

    assert set(lora.outputs) >= {"student", "student_adapter", "student_base"}
    merged = AutoModelForCausalLM.from_pretrained(lora.outputs["student"]).eval()
    base = AutoModelForCausalLM.from_pretrained(lora.outputs["student_base"])
    adapted = PeftModel.from_pretrained(base, lora.outputs["student_adapter"]).eval()
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        merged_logits = merged(input_ids=ids).logits
        # W x + s B A x vs (W + s B A) x: the same up to float32 rounding
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged_logits, rtol=1e-4, atol=5e-5)
        with adapted.disable_adapter():  # while the adapter itself changed the logits a lot
            assert (adapted(input_ids=ids).logits - merged_logits).abs().max() > 0.1

    from safetensors.torch import load_file

    initial = _initial_student(common).state_dict()
    base_state = load_file(lora.outputs["student_base"] / "model.safetensors")
    merged_state = load_file(lora.outputs["student"] / "model.safetensors")
    assert sorted(base_state) == sorted(merged_state) == sorted(initial)
    for key, tensor in initial.items():
        assert torch.equal(base_state[key], tensor), key  # the saved base is the untouched student
        if key.endswith("_proj.weight"):
            assert not torch.equal(merged_state[key], tensor), key  # every projection learned
        else:
            assert torch.equal(merged_state[key], tensor), key  # embeddings, norms, head: frozen


def test_rollout_engine_and_self_teacher_receive_the_merged_student(tiny_overrides, tmp_path):
    """On-policy self-distillation with LoRA: after each step the rollout engine and the teacher
    (refreshed every step) hold exactly peft's merge of the student; the base never moves."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", chat_rows(4, seed=7))
    overrides = tiny_overrides + LORA + [
        "+recipe=self_distill", "teacher.ema_decay=null", "teacher.update_freq=1", f"data.train={prompts}",
        "train.global_batch_size=4", "train.max_steps=2", "rollout.max_new_tokens=8", "train.lr=1e-2",
        "train.warmup_ratio=0", "eval.before=false", "save_student=false",
    ]
    with built(kdlib.compose(overrides), run_dir=tmp_path / "run") as loop:
        loop.run()
        student = loop.pipeline.students.group.workers[0].model
        reference = copy.deepcopy(student).merge_and_unload().state_dict()
        engines = {
            "rollout": loop.pipeline.rollout.group.workers[0].backend.model.state_dict(),
            "teacher": loop.pipeline.teacher.group.workers[0].backend.model.state_dict(),
        }
        for role, state in engines.items():
            assert sorted(state) == sorted(reference), role
            for key, tensor in reference.items():
                assert torch.equal(state[key], tensor), f"{role}: {key}"
        initial = _initial_student(overrides).state_dict()
        own = dict(student.named_parameters())
        for key, tensor in initial.items():
            peft_key = "base_model.model." + key.replace("_proj.weight", "_proj.base_layer.weight")
            assert torch.equal(own[peft_key].detach(), tensor), key
        assert any(not torch.equal(reference[k], initial[k]) for k in initial)  # and the adapters did learn

        # AdamW holds two float32 moments (and a step count) per adapter tensor, nothing else
        stats = loop.pipeline.students.parameter_stats()[0]
        adapters = [p for p in student.parameters() if p.requires_grad]
        assert stats["trainable_parameters"] == sum(p.numel() for p in adapters) == 4 * 1024 * 2  # r (in + out) x 7 x 2 layers
        assert stats["optimizer_state_bytes"] == 2 * 4 * stats["trainable_parameters"] + 4 * len(adapters)
        assert stats["parameters"] == sum(p.numel() for p in student.parameters())


def test_lora_resume_reproduces_the_uninterrupted_run(tiny_overrides, tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    common = tiny_overrides + LORA + [
        "train.max_steps=3", "eval.before=false", "train.checkpoint_every=1", "train.keep_checkpoints=5", "train.lr=1e-2",
    ]
    full = kdlib.run(kdlib.compose(common + [f"output_dir={tmp_path / 'full'}"]))
    checkpoint = full.run_dir / "checkpoints" / "step_1"
    saved = FileSystemReader(str(checkpoint)).read_metadata().state_dict_metadata
    model_keys = [k for k in saved if k.startswith("model.")]
    assert model_keys and all(".lora_A." in k or ".lora_B." in k for k in model_keys)  # no frozen base
    resumed = kdlib.run(kdlib.compose(common + [f"train.resume={checkpoint}", f"output_dir={tmp_path / 'resumed'}"]))
    rows_full, rows_resumed = _rows(full), _rows(resumed)
    assert [r["step"] for r in rows_resumed] == [2, 3]
    for a, b in zip(rows_full[1:], rows_resumed, strict=True):
        assert b["loss"] == a["loss"] and b["grad_norm"] == a["grad_norm"] and b["lr"] == a["lr"]
    from safetensors.torch import load_file

    a = load_file(full.outputs["student_adapter"] / "adapter_model.safetensors")
    b = load_file(resumed.outputs["student_adapter"] / "adapter_model.safetensors")
    assert sorted(a) == sorted(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_with_packing_and_accumulation_keeps_the_objective(tiny_overrides, tmp_path):
    """Micro-batches of 2 (four accumulated per step), packed by a token budget, or with activation
    checkpointing: same losses."""
    base = tiny_overrides + LORA + ["train.max_steps=2", "eval.before=false", "save_student=false", "train.lr=1e-2"]
    runs = {}
    for name, extra in {"plain": [], "accumulated": ["train.micro_batch_size=2"],
                        "packed": ["train.max_tokens_per_micro_batch=200", "train.packing=true"],
                        "checkpointed": ["student.gradient_checkpointing=true"]}.items():
        runs[name] = _rows(kdlib.run(kdlib.compose(base + extra + [f"output_dir={tmp_path / name}"])))
    assert runs["accumulated"][0]["micro_batches"] == 4 and runs["packed"][0]["micro_batches"] > 2
    for name in ("accumulated", "packed", "checkpointed"):
        for a, b in zip(runs["plain"], runs[name], strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), name
            assert b["loss_tokens"] == a["loss_tokens"], name


@pytest.mark.slow
def test_lora_run_of_the_embedded_default_finishes_and_its_outputs_load(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cfg = kdlib.compose(["+recipe=quickstart", "student.lora.r=8", "logging.progress=false", "save_dtype=float32",
                         f"output_dir={tmp_path}"])  # float32: the merge is compared with the adapter exactly
    result = kdlib.run(cfg)
    assert len(_rows(result)) == 5 and result.eval_after["kl"] < result.eval_before["kl"]
    merged = AutoModelForCausalLM.from_pretrained(result.outputs["student"]).eval()
    assert merged.config.num_hidden_layers == 20  # the default preset: 20 layers, pruned by importance
    base = AutoModelForCausalLM.from_pretrained(result.outputs["student_base"])
    adapted = PeftModel.from_pretrained(base, result.outputs["student_adapter"]).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        # W x + s B (A x) against (W + s B A) x: float32 reassociation through 20 layers, logits of size ~10
        torch.testing.assert_close(adapted(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=1e-4, atol=1e-3)
