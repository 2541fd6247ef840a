"""The central claim for images: KD from teacher hidden states + teacher lm_head == KD from the
teacher's full logits, for image+text batches, with a teacher that sees other image resolutions.

The reference runs each model on its processor's own batched call over the whole chats and
divides materialised logits; kdlib runs its lazily collated micro-batch through the image-aware
forward to hidden states at the loss positions and the KD loss from hidden states and both heads.
Everything is float64, so the two agree to float64 rounding; gradients reach the vision tower too.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

from kdlib.batch import TokenBatch
from kdlib.config import DataConfig, LossImplementation
from kdlib.data.formats import detect_format
from kdlib.data.images import open_image
from kdlib.data.multimodal import data_root, row_to_vision_conversation
from kdlib.data.sources import load_rows
from kdlib.data.vision_encoding import VisionChatEncoder, VisionInputs
from kdlib.data.vision_samples import build_vision_samples, collate_vision
from kdlib.losses import distillation_loss, loss_params
from kdlib.losses.registry import LOSSES
from kdlib.models.head import lm_head_of
from kdlib.models.vlm import vision_parameters, vlm_hidden_at_loss_positions
from kdlib.demo.vlm import make_image, qwen3_vl_inputs


def _loss_cfg(name: str, implementation: LossImplementation):
    cfg = LOSSES.entry(name).config_cls(name=name)
    cfg.implementation = implementation
    cfg.temperature = 2.0
    cfg.chunk_size = 7
    return cfg


def _model(path):
    return AutoModelForImageTextToText.from_pretrained(path).to(torch.float64)


@pytest.mark.parametrize(
    "loss_name, implementation",
    [("kl", LossImplementation.naive), ("kl", LossImplementation.fused), ("jsd", LossImplementation.fused)],
)
@pytest.mark.parametrize("family", ["idefics3", "gemma3"])
def test_image_text_kd_from_hidden_states_equals_full_logit_kd(family, loss_name, implementation, tiny_vlm, vlm_chat_data):
    student_dir, teacher_dir = tiny_vlm(family), tiny_vlm(family, hires=True)
    student_processor, teacher_processor = AutoProcessor.from_pretrained(student_dir), AutoProcessor.from_pretrained(teacher_dir)
    student_encoder = VisionChatEncoder(student_processor, name="student")
    teacher_encoder = VisionChatEncoder(teacher_processor, name="teacher")
    samples, _ = build_vision_samples(
        DataConfig(train=str(vlm_chat_data)), "train", student_encoder, teacher_encoder
    )
    samples = samples[:4]  # one image, two images, text only, two turns
    collated = collate_vision(samples, student_encoder, teacher_encoder)
    student_view, teacher_view = student_encoder.attach(collated.student), teacher_encoder.attach(collated.teacher)
    student, teacher = _model(student_dir), _model(teacher_dir).eval()
    student.train()
    params = [student.model.get_decoder().layers[0].mlp.up_proj.weight, vision_parameters(student)[-1][1]]
    loss_cfg = _loss_cfg(loss_name, implementation)

    # reference: each model on its processor's batched call over the whole chats, full logits
    chats, images = _chats(vlm_chat_data, [s.index for s in samples])

    def full_logits(model, processor, tokens: TokenBatch):
        texts = [processor.apply_chat_template(chat.template_messages(), tokenize=False) for chat in chats]
        inputs = processor(text=texts, images=images, add_special_tokens=False, padding=True, return_tensors="pt")
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.float64)
        length = tokens.input_ids.shape[1]
        assert torch.equal(inputs["input_ids"][:, :length] * tokens.attention_mask, tokens.input_ids * tokens.attention_mask)
        return model(**inputs).logits[:, :length][tokens.loss_mask]

    with torch.no_grad():
        teacher_logits = full_logits(teacher, teacher_processor, teacher_view)
    student_logits = full_logits(student, student_processor, student_view)
    reference = _float64_divergence(loss_name, student_logits, teacher_logits, loss_cfg)
    ref_grads = torch.autograd.grad(reference, params)

    # kdlib: teacher hidden states at its loss positions, student recomputes the teacher's logits
    with torch.no_grad():
        teacher_hidden = vlm_hidden_at_loss_positions(teacher, teacher_view)
    assert teacher_hidden.shape == (collated.n_loss_tokens, teacher.config.text_config.hidden_size)
    terms = distillation_loss(
        vlm_hidden_at_loss_positions(student, student_view), lm_head_of(student),
        teacher_hidden, lm_head_of(teacher), None, loss_cfg, kd_weight=1.0, ce_weight=0.0, normaliser=1.0,
    )
    grads = torch.autograd.grad(terms.loss, params)
    assert reference.item() > 1e-3  # distinct random models: a non-trivial divergence
    # the fused loss keeps float64 inputs in float64; the naive one computes divergences in float32
    rtol = 1e-10 if implementation is LossImplementation.fused else 1e-5
    torch.testing.assert_close(terms.loss.double(), reference, rtol=rtol, atol=1e-12)
    for grad, ref_grad in zip(grads, ref_grads):
        assert ref_grad.abs().max() > 0
        torch.testing.assert_close(grad, ref_grad, rtol=10 * rtol, atol=10 * rtol * ref_grad.abs().max().item())


def test_qwen3_vl_kd_from_hidden_states_equals_full_logit_kd(tiny_vlm):
    """Model level (its processor needs torchvision): M-RoPE positions from mm_token_type_ids and
    DeepStack features go through kdlib's forward exactly as through the model's own."""
    student_dir, teacher_dir = tiny_vlm("qwen3_vl"), tiny_vlm("qwen3_vl", hires=True)
    chat = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    texts = [chat + "A fox.<|im_end|>", chat.replace("What", "Two plus three. What") + "Paris is the capital.<|im_end|>"]
    images = [[make_image(128, 96, 0)], [make_image(80, 144, 1)]]  # above both pixel budgets
    student, teacher = _model(student_dir), _model(teacher_dir).eval()
    loss_cfg = _loss_cfg("kl", LossImplementation.fused)

    def view(path):
        inputs = qwen3_vl_inputs(path, texts, images)
        ids = inputs["input_ids"]
        assistant = AutoTokenizer.from_pretrained(str(path))("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"]
        loss = torch.zeros_like(ids, dtype=torch.bool)
        for row in range(ids.shape[0]):  # positions before each response token, through <|im_end|>
            start = _last_match(ids[row].tolist(), assistant)
            end = int(inputs["attention_mask"][row].sum()) - 1
            loss[row, start - 1 : end] = True
        tokens = TokenBatch(ids, inputs["attention_mask"], loss)
        vision = VisionInputs(pixel_values=inputs["pixel_values"], image_grid_thw=inputs["image_grid_thw"],
                              token_types=inputs["mm_token_type_ids"], token_types_key="mm_token_type_ids")
        return inputs, tokens, vision

    s_inputs, s_tokens, s_vision = view(student_dir)
    t_inputs, t_tokens, t_vision = view(teacher_dir)
    assert t_tokens.input_ids.shape[1] > s_tokens.input_ids.shape[1]  # more image tokens for the teacher
    assert torch.equal(t_tokens.targets(), s_tokens.targets())
    with torch.no_grad():
        teacher_logits = teacher(**_float64(t_inputs)).logits[t_tokens.loss_mask]
    student_logits = student(**_float64(s_inputs)).logits[s_tokens.loss_mask]
    reference = _float64_divergence("kl", student_logits, teacher_logits, loss_cfg)
    (ref_grad,) = torch.autograd.grad(reference, student.model.visual.merger.linear_fc1.weight)
    with torch.no_grad():
        teacher_hidden = vlm_hidden_at_loss_positions(teacher, t_tokens, t_vision)
    terms = distillation_loss(
        vlm_hidden_at_loss_positions(student, s_tokens, s_vision), lm_head_of(student), teacher_hidden,
        lm_head_of(teacher), None, loss_cfg, kd_weight=1.0, ce_weight=0.0, normaliser=1.0,
    )
    (grad,) = torch.autograd.grad(terms.loss, student.model.visual.merger.linear_fc1.weight)
    torch.testing.assert_close(terms.loss, reference, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


def _float64_divergence(name, student_logits, teacher_logits, loss_cfg) -> torch.Tensor:
    """The summed divergence computed in float64 on the materialised logits (the reference)."""
    divergence = LOSSES.get(name)
    t = loss_cfg.temperature
    return divergence(student_logits / t, teacher_logits / t, **loss_params(loss_cfg)).sum()


def _chats(path, indices: list[int]):
    """The conversations and opened images of rows ``indices``, parsed independently."""
    cfg = DataConfig(train=str(path))
    source = load_rows(str(path), split="train", key="data.train")
    fmt = detect_format(list(source.rows.column_names), cfg, "x")
    chats = [row_to_vision_conversation(source.rows[i], fmt, cfg, data_root(source.name), "x") for i in indices]
    return chats, [[open_image(ref, "x") for ref in chat.images] for chat in chats]


def _last_match(ids: list[int], pattern: list[int]) -> int:
    """Index just after the last occurrence of ``pattern`` in ``ids``."""
    return max(i + len(pattern) for i in range(len(ids) - len(pattern) + 1) if ids[i : i + len(pattern)] == pattern)


def _float64(inputs: dict) -> dict:
    return {k: v.to(torch.float64) if k == "pixel_values" else v for k, v in inputs.items()}
