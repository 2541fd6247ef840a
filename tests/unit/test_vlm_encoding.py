"""Each model's processor renders image+text samples; response spans and loss positions are exact,
also for a teacher whose image preprocessing gives different placeholder counts."""

from __future__ import annotations

import pickle

import pytest
import torch
from transformers import AutoProcessor

from kdlib.config import DataConfig
from kdlib.data.formats import detect_format
from kdlib.data.images import open_image
from kdlib.data.multimodal import data_root, row_to_vision_conversation
from kdlib.data.sources import load_rows
from kdlib.data.vision_encoding import VisionChatEncoder
from kdlib.data.vision_samples import build_vision_samples, collate_vision
from kdlib.errors import ModelError

FAMILIES = ["idefics3", "gemma3"]
# What the tiny templates put before and after a trained response (see kdlib.demo.vlm).
ASSISTANT_HEADER = {"idefics3": "Assistant:", "gemma3": "<start_of_turn>model\n"}
END_OF_TURN = {"idefics3": "<end_of_utterance>", "gemma3": "<end_of_turn>"}


def _encoders(tiny_vlm, family):
    student = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm(family)), name="student")
    teacher = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm(family, hires=True)), name="teacher")
    return student, teacher


def _conversations(path):
    """(conversation, opened images) per row, parsed independently of build_vision_samples."""
    cfg = DataConfig(train=str(path))
    source = load_rows(str(path), split="train", key="data.train")
    fmt = detect_format(list(source.rows.column_names), cfg, "x")
    out = []
    for i, row in enumerate(source.rows):
        conversation = row_to_vision_conversation(row, fmt, cfg, data_root(source.name), str(i))
        out.append((conversation, [open_image(ref, "x") for ref in conversation.images]))
    return out


def _hand_span(processor, family, conversation, images) -> tuple[list[int], int, int]:
    """The whole chat through the processor in one call; the response starts after the last
    assistant header and ends with the first end-of-turn token after it (inclusive)."""
    text = processor.apply_chat_template(conversation.template_messages(), tokenize=False)
    ids = processor(text=[text], images=[images] if images else None, add_special_tokens=False)["input_ids"][0]
    ids = list(ids)
    header = processor.tokenizer(ASSISTANT_HEADER[family], add_special_tokens=False)["input_ids"]
    starts = [i + len(header) for i in range(len(ids) - len(header) + 1) if ids[i : i + len(header)] == header]
    start = starts[-1]
    end = ids.index(processor.tokenizer.convert_tokens_to_ids(END_OF_TURN[family]), start)
    return ids, start, end


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_positions_equal_a_hand_computed_span(family, tiny_vlm, vlm_chat_data):
    student, _ = _encoders(tiny_vlm, family)
    samples, report = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", student)
    assert report.kept == report.rows == 8
    tokens = collate_vision(samples, student).student
    for row, (sample, (conversation, images)) in enumerate(zip(samples, _conversations(vlm_chat_data))):
        ids, start, end = _hand_span(student.processor, family, conversation, images)
        assert sample.student.input_ids == ids[: end + 1] and sample.student.response_start == start
        assert tokens.loss_mask[row].nonzero().flatten().tolist() == list(range(start - 1, end))
        answer = conversation.turns[-1].text
        targets = tokens.input_ids[row, start : end + 1]
        assert student.tokenizer.decode(targets).strip() == answer + END_OF_TURN[family]
    assert int(tokens.loss_mask.sum()) == len(tokens.targets()) == sum(s.student.n_loss_tokens for s in samples)
    # the generation prompt (what on-policy rollouts start from) is exactly the trained sample's prompt
    for sample, (conversation, images) in zip(samples, _conversations(vlm_chat_data)):
        prompt = student.encode_prompt(conversation, images, "x")
        assert prompt.input_ids == sample.student.input_ids[: sample.student.response_start]
        assert (prompt.images is None) == (not images)


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_with_other_image_resolution_scores_the_same_response_tokens(family, tiny_vlm, vlm_chat_data):
    student, teacher = _encoders(tiny_vlm, family)
    assert student.signature() != teacher.signature()
    samples, report = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", student, teacher)
    assert report.kept == 8
    image_ids = student.image_token_ids | {student.tokenizer.convert_tokens_to_ids(student.image_token)}
    for sample, (conversation, images) in zip(samples, _conversations(vlm_chat_data)):
        ids, start, end = _hand_span(teacher.processor, family, conversation, images)
        assert sample.teacher.input_ids == ids[: end + 1] and sample.teacher.response_start == start
        assert sample.teacher.input_ids[start:] == sample.student.input_ids[sample.student.response_start:]
        n_student = sum(t in image_ids for t in sample.student.input_ids)
        n_teacher = sum(t in image_ids for t in sample.teacher.input_ids)
        assert (n_teacher > n_student) if images else (n_teacher == n_student == 0)
    batch = collate_vision(samples, student, teacher)
    assert torch.equal(batch.teacher.targets(), batch.student.targets())
    assert batch.teacher.input_ids.shape[1] > batch.student.input_ids.shape[1]
    assert batch.teacher.images is batch.student.images  # one set of references for both views
    # each side lays out the same pictures at its own resolution
    teacher_pixels, student_pixels = teacher.attach(batch.teacher).vision, student.attach(batch.student).vision
    assert teacher_pixels.pixel_values.shape != student_pixels.pixel_values.shape


@pytest.mark.parametrize("family", FAMILIES)
def test_collated_images_equal_the_processors_own_batch(family, tiny_vlm, vlm_chat_data):
    """Micro-batches carry image references; the worker that runs the model lays out the pixels
    with its processor. The tensors are those the processor makes for the same chats in one batched
    call, and so are token ids and per-token modality ids; the references survive pickling (what
    Ray does to a micro-batch) and give the same tensors on the other side."""
    student, _ = _encoders(tiny_vlm, family)
    samples, _ = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", student)
    collated = collate_vision(samples, student)
    assert collated.student.images.count == sum(len(s.images) for s in samples) > 0
    assert collated.student.vision is None or not collated.student.vision.has_images  # no pixels travel
    tokens = student.attach(pickle.loads(pickle.dumps(collated)).student)
    conversations = _conversations(vlm_chat_data)
    texts = [student.processor.apply_chat_template(c.template_messages(), tokenize=False) for c, _ in conversations]
    reference = student.processor(
        text=texts, images=[images for _, images in conversations], add_special_tokens=False, padding=True,
        return_tensors="pt",
    )
    inputs = tokens.vision.model_kwargs()
    assert set(inputs) == set(reference) - {"input_ids", "attention_mask"}
    for key, value in inputs.items():
        if value.shape[1:] == tokens.input_ids.shape[1:]:  # per-token: compare over our rows
            for row, sample in enumerate(samples):
                assert torch.equal(value[row, : len(sample.student)], reference[key][row, : len(sample.student)])
        else:
            assert torch.equal(value, reference[key]), key
    for row, sample in enumerate(samples):
        assert tokens.input_ids[row, : len(sample.student)].tolist() == reference["input_ids"][row, : len(sample.student)].tolist()


@pytest.mark.parametrize("family", FAMILIES)
def test_overlong_samples_keep_the_prompt_and_token_types_aligned(family, tiny_vlm, vlm_chat_data):
    student, _ = _encoders(tiny_vlm, family)
    full, _ = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", student)
    prompts = sorted(s.student.response_start for s in full)
    max_len = prompts[len(prompts) // 2] + 2  # half the prompts fit, with two response tokens
    samples, report = build_vision_samples(DataConfig(train=str(vlm_chat_data), max_len=max_len), "train", student)
    too_long = sum(p + 1 > max_len for p in prompts)
    assert 0 < too_long < 8
    assert report.dropped == {f"prompt longer than data.max_len={max_len}": too_long}
    assert report.kept == 8 - too_long and report.truncated > 0
    assert report.truncated == sum(len(s.student) > max_len for s in full if s.student.response_start + 1 <= max_len)
    for sample in samples:
        assert len(sample.student) <= max_len
        if student.token_types_key is not None:
            assert len(sample.student.token_types) == len(sample.student)


def test_an_unknown_processor_output_is_an_error(tiny_vlm, vlm_chat_data, monkeypatch):
    student, _ = _encoders(tiny_vlm, "idefics3")
    samples, _ = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", student)
    image_processor = student.processor.image_processor
    original = type(image_processor).__call__

    def with_extra(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        out["pixel_cookies"] = torch.zeros(1)
        return out

    monkeypatch.setattr(type(image_processor), "__call__", with_extra)
    student.model_input_names.add("pixel_cookies")
    with pytest.raises(ModelError, match=r"returns \['pixel_cookies'\], which kdlib does not pass to models"):
        student.attach(collate_vision(samples[:1], student).student)
