"""VLMs as kdlib loads them: the head check with an image in the probe, depth pruning of the
language model (saves, reloads, generates with its processor), a frozen or trainable vision side."""

from __future__ import annotations

import shutil

import pytest
import torch
from transformers import AutoModelForImageTextToText, AutoProcessor

from kdlib.config import StudentConfig
from kdlib.config.schema import ModelConfig
from kdlib.errors import ModelError
from kdlib.models.head import HeadMismatchError, decoder_of, lm_head_of, verify_lm_head
from kdlib.models.vlm import (
    build_vlm,
    image_probe,
    is_vision_language,
    load_processor,
    set_vision_trainable,
    vision_parameters,
    verify_vlm_head,
)
from kdlib.demo.vlm import make_image, qwen3_vl_inputs

PROCESSOR_FAMILIES = ["idefics3", "gemma3"]
QWEN_CHAT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n"


def _probe(family, path):
    if family == "qwen3_vl":
        return qwen3_vl_inputs(path, [QWEN_CHAT], [[make_image(64, 48)]])
    return image_probe(AutoProcessor.from_pretrained(path))


@pytest.mark.parametrize("family", [*PROCESSOR_FAMILIES, "qwen3_vl"])
def test_head_reproduces_logits_with_an_image_in_the_probe(family, tiny_vlm):
    path = tiny_vlm(family)
    model = AutoModelForImageTextToText.from_pretrained(path).eval()
    assert is_vision_language(model.config)
    probe = _probe(family, path)
    assert "pixel_values" in probe
    head = lm_head_of(model)
    verify_lm_head(model, head, probe_inputs=probe)
    if family != "qwen3_vl":
        assert verify_vlm_head(model, AutoProcessor.from_pretrained(path)).weight is head.weight
    # an output transform kdlib does not know about fails loudly, also on the image path
    model.config.get_text_config().logit_scale = 2.0
    with pytest.raises(HeadMismatchError, match="kdlib does not know"):
        verify_lm_head(model, lm_head_of(model), probe_inputs=probe)


@pytest.mark.parametrize("family", [*PROCESSOR_FAMILIES, "qwen3_vl"])
def test_pruned_vlm_saves_reloads_and_generates(family, tiny_vlm, tmp_path):
    path = tiny_vlm(family)
    full = AutoModelForImageTextToText.from_pretrained(path).eval()
    layer_types = getattr(full.config.get_text_config(), "layer_types", None)
    model = build_vlm(StudentConfig(model=str(path), keep_layers=[0, 2, 3]), torch.device("cpu")).eval()
    text_config = model.config.get_text_config()
    assert text_config.num_hidden_layers == 3 and len(decoder_of(model).layers) == 3
    if layer_types is not None:
        assert text_config.layer_types == [layer_types[i] for i in (0, 2, 3)]
    for new, old in enumerate([0, 2, 3]):
        torch.testing.assert_close(decoder_of(model).layers[new].mlp.up_proj.weight, decoder_of(full).layers[old].mlp.up_proj.weight)
    for (name, param), (_, original) in zip(vision_parameters(model), vision_parameters(full)):
        assert torch.equal(param, original), name  # the vision side is untouched

    if family == "qwen3_vl":
        shutil.copytree(path, tmp_path / "pruned")  # tokenizer and image processor (no processor without torchvision)
        inputs = qwen3_vl_inputs(path, [QWEN_CHAT], [[make_image(64, 48)]])
    else:
        processor = AutoProcessor.from_pretrained(path)
        processor.save_pretrained(tmp_path / "pruned")
        inputs = image_probe(processor)
    model.save_pretrained(tmp_path / "pruned")
    reloaded = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned").eval()
    assert reloaded.config.get_text_config().num_hidden_layers == 3
    with torch.no_grad():
        logits = model(**inputs).logits
        torch.testing.assert_close(reloaded(**inputs).logits, logits)
        assert not torch.allclose(full(**inputs).logits, logits)  # pruning changed the model
        n_prompt = inputs["input_ids"].shape[1]
        cached = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5)
        uncached = reloaded.generate(**inputs, max_new_tokens=5, do_sample=False, min_new_tokens=5, use_cache=False)
    assert cached.shape == (1, n_prompt + 5)
    assert torch.equal(cached, uncached)  # KV cache indices renumbered correctly
    if family != "qwen3_vl":
        text = AutoProcessor.from_pretrained(tmp_path / "pruned").decode(cached[0, n_prompt:])
        assert isinstance(text, str) and text


@pytest.mark.parametrize("family", PROCESSOR_FAMILIES)
def test_vision_side_frozen_by_request_and_trainable_again(family, tiny_vlm):
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm(family))
    vision = vision_parameters(model)
    vision_names = {name for name, _ in vision}
    # the vision tower and its projector, nothing of the language model or head
    assert vision_names and all(".language_model." not in name and "lm_head" not in name for name in vision_names)
    assert any("projector" in name or "connector" in name for name in vision_names)
    assert set_vision_trainable(model, False) == sum(p.numel() for _, p in vision)
    probe = image_probe(AutoProcessor.from_pretrained(tiny_vlm(family)))
    model(**probe).logits.square().mean().backward()
    for name, param in model.named_parameters():
        if name in vision_names:
            assert not param.requires_grad and param.grad is None, name
        else:
            assert param.requires_grad, name
    assert decoder_of(model).layers[0].mlp.up_proj.weight.grad.abs().max() > 0
    set_vision_trainable(model, True)
    assert all(p.requires_grad for _, p in vision)


def test_processor_loading_errors_are_one_line_model_errors(tiny_vlm, tmp_path):
    from transformers.utils import is_torchvision_available

    with pytest.raises(ModelError, match="model directory not found"):
        load_processor(ModelConfig(model=str(tmp_path / "nope")))
    if not is_torchvision_available():
        # Qwen3-VL's processor holds a video processor, which transformers builds only with torchvision
        with pytest.raises(ModelError, match=r"cannot load the processor of .*torchvision") as caught:
            load_processor(ModelConfig(model=str(tiny_vlm("qwen3_vl"))))
        assert "\n" not in str(caught.value)
    processor = load_processor(ModelConfig(model=str(tiny_vlm("idefics3")), chat_template="{{ 'x' }}"))
    assert processor.chat_template == "{{ 'x' }}"
