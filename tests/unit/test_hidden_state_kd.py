"""The central claim: KD from teacher hidden states + teacher lm_head == KD from full teacher logits.

The teacher runs as a real TeacherWorker and its outputs go through the transport, as in training.
With float32 on the wire the two agree to float32 rounding; with the default bf16 wire they agree to
bf16 rounding of the hidden states (documented tolerance below).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from kdlib.config import HiddenDtype, LossImplementation, TeacherConfig, TransportConfig
from kdlib.data.batching import collate
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import build_samples
from kdlib.config import DataConfig
from kdlib.losses import distillation_loss, loss_params, per_token_divergence
from kdlib.losses.registry import LOSSES
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import lm_head_of
from kdlib.demo.text import build_model
from kdlib.workers.specs import TeacherSpec
from kdlib.workers.teacher import TeacherWorker

# Relative error of the KD value when hidden states travel as bf16 (8 mantissa bits).
BF16_WIRE_RTOL = 2e-2


@pytest.fixture(scope="module")
def batch(chat_data, chatml_tokenizer_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chatml_tokenizer_dir)
    samples, _ = build_samples(DataConfig(train=str(chat_data["train"])), "train", ChatEncoder(tokenizer))
    return collate(samples[:6], student_pad_id=tokenizer.pad_token_id)


@pytest.fixture(scope="module")
def wide_teacher(tiny_dir, chatml_tokenizer_dir):
    """A teacher whose head has padded rows beyond the tokenizer (Vt > Vs)."""
    path = tiny_dir / "wide_teacher"
    build_model(path, arch="qwen3", tokenizer_dir=chatml_tokenizer_dir, vocab_size=400, seed=5)
    return path


def _loss_cfg(name: str, implementation: LossImplementation, temperature: float = 1.0):
    cfg = LOSSES.entry(name).config_cls(name=name)
    cfg.implementation = implementation
    cfg.temperature = temperature
    cfg.chunk_size = 7
    return cfg


@pytest.mark.parametrize("loss_name", ["kl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("implementation", [LossImplementation.naive, LossImplementation.fused])
@pytest.mark.parametrize("teacher_fixture", ["tiny_llama", "wide_teacher"])
def test_hidden_state_kd_equals_full_logit_kd(loss_name, implementation, teacher_fixture, tiny_qwen3, batch, request):
    teacher_path = request.getfixturevalue(teacher_fixture)
    loss_cfg = _loss_cfg(loss_name, implementation, temperature=2.0)
    student = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_path).eval()

    # reference: the teacher's full logits from its own forward, the divergence on materialised logits
    with torch.no_grad():
        teacher_logits = teacher_model(**_inputs(batch)).logits[batch.student.loss_mask]
    student_logits = student(**_inputs(batch)).logits[batch.student.loss_mask]
    reference = per_token_divergence(
        loss_name, student_logits, teacher_logits, temperature=2.0, **loss_params(loss_cfg)
    ).sum()
    (ref_grad,) = torch.autograd.grad(reference, student.model.layers[0].mlp.up_proj.weight)

    # kdlib: a teacher worker sends hidden states through the transport; the student recomputes
    worker = TeacherWorker(TeacherSpec(TeacherConfig(model=str(teacher_path)), TransportConfig(name="inprocess", dtype=HiddenDtype.float32), "cpu"))
    (handle,) = worker.forward([batch]).handles
    teacher_hidden = worker.transport.fetch(handle).hidden
    assert teacher_hidden.dtype == torch.float32
    assert teacher_hidden.shape == (batch.n_loss_tokens, teacher_model.config.hidden_size)
    terms = distillation_loss(
        hidden_at_loss_positions(student, batch.student), lm_head_of(student),
        teacher_hidden, worker.lm_head(), None, loss_cfg, kd_weight=1.0, ce_weight=0.0, normaliser=1.0,
    )
    (grad,) = torch.autograd.grad(terms.loss, student.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(terms.loss, reference, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_bf16_wire_is_close_to_full_logit_kd(tiny_llama, tiny_qwen3, batch):
    loss_cfg = _loss_cfg("kl", LossImplementation.naive)
    student = AutoModelForCausalLM.from_pretrained(tiny_qwen3)
    teacher_model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    with torch.no_grad():
        teacher_logits = teacher_model(**_inputs(batch)).logits[batch.student.loss_mask]
        student_logits = student(**_inputs(batch)).logits[batch.student.loss_mask]
        reference = per_token_divergence("kl", student_logits, teacher_logits).sum()
    worker = TeacherWorker(TeacherSpec(TeacherConfig(model=str(tiny_llama)), TransportConfig(name="inprocess"), "cpu"))
    (handle,) = worker.forward([batch]).handles
    hidden = worker.transport.fetch(handle).hidden
    assert hidden.dtype == torch.bfloat16  # the default wire type, never fp16
    with torch.no_grad():
        terms = distillation_loss(
            hidden_at_loss_positions(student, batch.student), lm_head_of(student), hidden, worker.lm_head(),
            None, loss_cfg, kd_weight=1.0, ce_weight=0.0, normaliser=1.0,
        )
    assert abs(terms.loss.item() - reference.item()) <= BF16_WIRE_RTOL * reference.item()


def _inputs(batch):
    return {"input_ids": batch.student.input_ids, "attention_mask": batch.student.attention_mask}
