"""The pieces that carry image+text batches through the pipeline: what travels (references, not
pixels), what keys the teacher cache, the idle vision pass of a sharded student, the vision blocks
FSDP2 shards, generation about images, and the built-in demo assets."""

from __future__ import annotations

import io
import json
import pickle

import pytest
import torch
from PIL import Image as PILImage
from transformers import AutoModelForImageTextToText, AutoProcessor

from kdlib.batch import BatchImages, PromptImages
from kdlib.cache.fingerprint import processor_fingerprint, sample_key
from kdlib.backends.hf.options import HFRolloutConfig
from kdlib.config import DataConfig, ModelConfig, StudentConfig
from kdlib.data.images import ImageRef, image_digest, open_image
from kdlib.data.vision_encoding import VisionChatEncoder
from kdlib.data.vision_samples import VisionPrompt, build_vision_prompts, build_vision_samples, collate_vision, vision_rollout_sample
from kdlib.models.forward import hidden_at_loss_positions
from kdlib.models.head import decoder_of
from kdlib.models.vlm import vision_blocks, vision_parameters

FAMILIES = ["idefics3", "gemma3"]


def test_a_saved_dataset_with_an_image_column_sends_encoded_bytes_not_pictures(tiny_vlm, vlm_chat_data, tmp_path):
    """A datasets Image column is read undecoded: the references hold the files' own bytes (what
    travels to the workers), and the samples equal those of the same chats naming image files."""
    import datasets
    from datasets import Dataset, Image, List

    rows = [json.loads(line) for line in vlm_chat_data.read_text().splitlines()]
    converted = []
    for row in rows:
        images, messages = [], []
        for message in row["messages"]:
            content = []
            for part in message["content"]:
                if part["type"] == "image":
                    images.append(str(vlm_chat_data.parent / part["image"]))
                    part = {"type": "image", "text": None}  # value-less: the next entry of the images column
                content.append(part)
            messages.append({"role": message["role"], "content": content})
        converted.append({"messages": messages, "images": images})
    Dataset.from_list(converted).cast_column("images", List(Image())).save_to_disk(str(tmp_path / "saved"))
    assert isinstance(datasets.load_from_disk(str(tmp_path / "saved"))[0]["images"][0], PILImage.Image)  # decodes by default

    encoder = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm("idefics3")))
    from_files, _ = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", encoder)
    from_saved, _ = build_vision_samples(DataConfig(train=str(tmp_path / "saved")), "train", encoder)
    assert [s.student for s in from_saved] == [s.student for s in from_files]
    assert [s.image_digests for s in from_saved] == [s.image_digests for s in from_files]
    refs = [ref for sample in from_saved for ref in sample.images]
    assert refs and all(ref.decoded is None and ref.data is not None for ref in refs)
    files = {path.read_bytes() for path in vlm_chat_data.parent.glob("img*.png")}
    assert all(ref.data in files for ref in refs)  # the files' own bytes
    assert len(pickle.dumps(refs)) < 1.1 * sum(len(ref.data) for ref in refs)


def test_image_digests_follow_the_pixels_not_the_encoding(vlm_images, tmp_path):
    opened = open_image(ImageRef(path=vlm_images["img0"]), "x")
    png = io.BytesIO()
    opened.save(png, format="PNG", compress_level=9)
    same = open_image(ImageRef(data=png.getvalue()), "x")
    assert image_digest(same) == image_digest(opened)
    changed = opened.copy()
    changed.putpixel((0, 0), tuple((c + 1) % 256 for c in changed.getpixel((0, 0))))
    assert image_digest(changed) != image_digest(opened)
    ids = [1, 2, 3, 4]
    assert sample_key(ids, 2) == sample_key(ids, 2, ())  # text keys unchanged
    keys = {sample_key(ids, 2), sample_key(ids, 2, [image_digest(opened)]), sample_key(ids, 2, [image_digest(changed)])}
    assert len(keys) == 3


def test_the_cache_namespace_covers_the_processors_image_settings(tiny_vlm):
    low, high = AutoProcessor.from_pretrained(tiny_vlm("idefics3")), AutoProcessor.from_pretrained(tiny_vlm("idefics3", hires=True))
    assert low.tokenizer.get_vocab() == high.tokenizer.get_vocab()  # same tokenizer, other resolution
    fingerprint = processor_fingerprint(low, apply_chat_template=True)
    assert fingerprint == processor_fingerprint(AutoProcessor.from_pretrained(tiny_vlm("idefics3")), apply_chat_template=True)
    assert fingerprint != processor_fingerprint(high, apply_chat_template=True)


@pytest.mark.parametrize("family", ["idefics3", "gemma3", "qwen3_vl"])
def test_vision_blocks_are_the_repeated_blocks_of_the_vision_side(family, tiny_vlm):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(family))
    blocks = vision_blocks(model)
    vision = {id(p) for _, p in vision_parameters(model)}
    in_blocks = {id(p) for block in blocks for p in block.parameters()}
    assert len(blocks) >= 2 and in_blocks <= vision  # two vision layers in every tiny family
    # everything else of the vision side (patch embedding, projector) is left to the FSDP2 root
    assert 0 < len(vision - in_blocks) < len(vision)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_idle_vision_pass_runs_the_tower_and_changes_nothing(family, tiny_vlm, vlm_chat_data):
    """A sharded student's text-only micro-batch runs the vision tower on a blank image (so ranks
    gather the vision blocks in step); the hidden states and the gradients of the language model
    are exactly those without it, and the trainable vision side gets exactly zero gradient."""
    encoder = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm(family)))
    samples, _ = build_vision_samples(DataConfig(train=str(vlm_chat_data)), "train", encoder)
    text_only = [s for s in samples if not s.images]
    view = collate_vision(text_only, encoder).student
    assert view.images is None
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(family)).double()
    calls = []
    blocks = vision_blocks(model)
    blocks[0].register_forward_hook(lambda *args: calls.append(1))
    plain = encoder.attach(view)
    idle = encoder.attach(view, idle_pixels=True)
    assert plain.vision is None or plain.vision.idle_pixels is None
    assert idle.vision.idle_pixels is not None and not idle.vision.has_images
    results = []
    for inputs in (plain, idle):
        model.zero_grad()
        hidden = hidden_at_loss_positions(model, inputs)
        hidden.pow(2).sum().backward()
        results.append((hidden.detach(), decoder_of(model).layers[0].mlp.up_proj.weight.grad.clone(),
                        [p.grad for _, p in vision_parameters(model)]))
    assert len(calls) == 1  # only the idle pass ran the tower
    torch.testing.assert_close(results[1][0], results[0][0], rtol=0, atol=0)
    torch.testing.assert_close(results[1][1], results[0][1], rtol=0, atol=0)
    assert all(g is None for g in results[0][2])
    touched = [g for g in results[1][2] if g is not None]
    assert touched and all(torch.count_nonzero(g) == 0 for g in touched)


@pytest.mark.parametrize("family", FAMILIES)
def test_batched_generation_about_images_equals_one_prompt_at_a_time(family, tiny_vlm, vlm_chat_data):
    """Left padding (ids, attention mask, token types) and batched pixels do not change what a
    prompt generates: greedy batched == greedy alone, for prompts with zero, one and two images."""
    from kdlib.backends.hf.rollout import HFRolloutBackend
    from kdlib.backends.hf.vision_rollout import HFImageGeneration

    path = tiny_vlm(family)
    encoder = VisionChatEncoder(AutoProcessor.from_pretrained(path))
    prompts, report = build_vision_prompts(DataConfig(train=str(vlm_chat_data)), encoder)
    assert report.kept == 8
    prompts = prompts[:4]
    assert sorted(len(p.images) for p in prompts) == [0, 1, 1, 2] and len({len(p.student_ids) for p in prompts}) > 1
    cfg = HFRolloutConfig(max_new_tokens=6, temperature=0.0, batch_size=4)
    engine = HFImageGeneration(HFRolloutBackend(ModelConfig(model=str(path)), torch.device("cpu"), cfg))

    def generate(chunk: list[VisionPrompt]):
        images = PromptImages(BatchImages([p.images for p in chunk], [p.where for p in chunk]), [p.student_types for p in chunk])
        return engine.generate([p.student_ids for p in chunk], images, stop_ids=encoder.end_of_turn_ids,
                               pad_id=encoder.pad_id, seed=0)

    together = generate(prompts)
    alone = [generate([p])[0] for p in prompts]
    assert together == alone
    assert all(len(g[0].token_ids) > 0 for g in together)


def test_a_rollout_sample_keeps_its_images_and_types_its_response_as_text(tiny_vlm, vlm_chat_data):
    student = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm("gemma3")))
    teacher = VisionChatEncoder(AutoProcessor.from_pretrained(tiny_vlm("gemma3", hires=True)))
    prompts, _ = build_vision_prompts(DataConfig(train=str(vlm_chat_data)), student, teacher)
    prompt = next(p for p in prompts if len(p.images) == 1)
    response = [7, 8, 9, student.eos_id]
    sample, cut = vision_rollout_sample(prompt, response, max_len=1024)
    assert not cut and not sample.cacheable and sample.images == prompt.images
    assert sample.student.input_ids == prompt.student_ids + response
    assert sample.teacher.input_ids == prompt.teacher_ids + response
    assert sample.student.token_types == prompt.student_types + [0] * 4
    assert sample.teacher.token_types == prompt.teacher_types + [0] * 4
    assert sum(sample.teacher.token_types) > sum(sample.student.token_types) > 0  # more image tokens at 64 px
    batch = collate_vision([sample], student, teacher)
    assert batch.student.targets().tolist() == response == batch.teacher.targets().tolist()


def test_the_vlm_quickstart_assets_build_once_and_deterministically(tmp_path):
    from kdlib.builtin_assets import builtin_location

    teacher = builtin_location("vlm_quickstart/teacher", tmp_path / "a")
    again = builtin_location("vlm_quickstart/teacher", tmp_path / "a")
    assert teacher == again and (teacher / "config.json").is_file()
    other = builtin_location("vlm_quickstart/train.jsonl", tmp_path / "b")
    assert other.read_bytes() == (teacher.parent / "train.jsonl").read_bytes()
    assert sorted(p.name for p in (teacher.parent / "images").iterdir()) == sorted(p.name for p in (other.parent / "images").iterdir())
    low = AutoProcessor.from_pretrained(teacher.parent / "student_processor")
    high = AutoProcessor.from_pretrained(teacher)
    assert low.tokenizer.get_vocab() == high.tokenizer.get_vocab()
    assert low.image_processor.size["longest_edge"] < high.image_processor.size["longest_edge"]
    with pytest.raises(FileNotFoundError, match="unknown built-in asset 'nope'; known: vlm_quickstart"):
        builtin_location("nope/x", tmp_path / "a")
    with pytest.raises(FileNotFoundError, match="no 'x.json' in the built-in asset"):
        builtin_location("vlm_quickstart/x.json", tmp_path / "a")


def test_a_frozen_vision_side_is_the_student_default(tiny_vlm):
    from kdlib.models.student import build_student

    frozen = build_student(StudentConfig(model=str(tiny_vlm("idefics3")), num_layers=2), torch.device("cpu")).model
    assert all(not p.requires_grad for _, p in vision_parameters(frozen))
    trainable = build_student(StudentConfig(model=str(tiny_vlm("idefics3")), freeze_vision=False), torch.device("cpu")).model
    assert all(p.requires_grad for p in trainable.parameters())
    assert frozen.config.get_text_config().num_hidden_layers == 2
