"""Tiny random vision-language models with their processors, built offline: the demo models of
``+recipe=vlm_quickstart`` (see kdlib.builtin_assets), and the tests'.

Each builder writes a directory that ``AutoProcessor`` and ``AutoModelForImageTextToText`` load
exactly as they load a real checkpoint: a random model from the family's real transformers config
classes (a 2-layer vision tower, a 4-layer language model), a small byte-level BPE tokenizer holding
the family's image and chat special tokens, the family's PIL ("slow") image processor and a chat
template written in the family's style. The families:

- ``idefics3`` (SmolVLM's architecture): images resized to a longest edge, split into tiles of the
  vision tower's size plus a global view, ``<image>`` placeholders per tile, ``pixel_attention_mask``.
- ``gemma3``: a fixed number of soft tokens per image, bidirectional attention over them
  (``token_type_ids``).
- ``qwen3_vl``: dynamic resolution (``image_grid_thw``), M-RoPE and DeepStack. Its processor also
  holds a video processor, which transformers 5 builds only with torchvision; without torchvision
  the builder writes the model, tokenizer and image processor, and :func:`qwen3_vl_inputs` expands
  the image placeholders as the processor would, for model-level tests.

Resolution options (longest edge, tile size, tokens per image, pixel budget) change how many
placeholder tokens an image becomes, which is what the teacher/student preprocessing tests vary.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from kdlib.demo.text import bpe_tokenizer, language_model_kwargs, random_model

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% if message['content'] is string %} {{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>"
    "{% else %} {{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "<start_of_turn>{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<start_of_image>"
    "{% else %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
QWEN_VL_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% else %}{{ part['text'] }}{% endif %}{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_IDEFICS3_ROW_COL = [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
_IDEFICS3_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
    *_IDEFICS3_ROW_COL,
]
_GEMMA3_SPECIALS = [
    "<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>",
    "<image_soft_token>",
]
_QWEN_VL_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>",
]
FAMILIES = ("idefics3", "gemma3", "qwen3_vl")


def build_vlm(directory: str | Path, family: str, **options) -> Path:
    """A tiny random VLM of ``family`` (see :data:`FAMILIES`) saved with its processor."""
    builders = {"idefics3": build_idefics3, "gemma3": build_gemma3, "qwen3_vl": build_qwen3_vl}
    if family not in builders:
        raise ValueError(f"unknown tiny VLM family {family!r}; choose one of {FAMILIES}")
    return builders[family](directory, **options)


def build_idefics3(
    directory: str | Path,
    *,
    longest_edge: int = 64,
    tile: int = 32,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
) -> Path:
    """Idefics3 / SmolVLM: images resized to ``longest_edge``, split into ``tile``-pixel tiles
    (4 placeholder tokens per 32-pixel tile) plus a global view."""
    from transformers import Idefics3Config

    patch, scale = 8, 2
    processor = idefics3_processor(longest_edge=longest_edge, tile=tile)
    tokenizer = processor.tokenizer
    config = Idefics3Config(
        text_config=dict(model_type="llama", **language_model_kwargs(tokenizer, hidden_size=hidden_size, num_layers=num_layers)),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=tile, patch_size=patch,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
    )
    return _save(directory, config, processor, seed)


def idefics3_processor(*, longest_edge: int = 64, tile: int = 32):
    """The tiny Idefics3 family's processor (tokenizer, image processor, chat template): the same
    tokenizer at every resolution, so processors of several resolutions can serve one model."""
    from transformers import Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tokenizer = bpe_tokenizer(
        _IDEFICS3_SPECIALS, eos_token="<end_of_utterance>", pad_token="<|endoftext|>", bos_token="<|im_start|>"
    )
    patch, scale = 8, 2
    return Idefics3Processor(
        image_processor=Idefics3ImageProcessorPil(size={"longest_edge": longest_edge}, max_image_size={"longest_edge": tile}),
        tokenizer=tokenizer,
        image_seq_len=(tile // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_TEMPLATE,
    )


def build_gemma3(
    directory: str | Path,
    *,
    image_size: int = 32,
    tokens_per_image: int = 4,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
) -> Path:
    """Gemma 3: every image resized to ``image_size`` and pooled to ``tokens_per_image`` soft tokens
    (a square number); sliding-window and full attention layers alternate."""
    from transformers import Gemma3Config, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tokenizer = bpe_tokenizer(
        _GEMMA3_SPECIALS, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={
            "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>",
        },
    )
    processor = Gemma3Processor(
        image_processor=Gemma3ImageProcessorPil(size={"height": image_size, "width": image_size}),
        tokenizer=tokenizer,
        image_seq_length=tokens_per_image,
        chat_template=GEMMA3_TEMPLATE,
    )
    language = language_model_kwargs(tokenizer, hidden_size=hidden_size, num_layers=num_layers)
    config = Gemma3Config(
        text_config=dict(
            head_dim=hidden_size // 4, sliding_window=16,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
            **language,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=8,
        ),
        mm_tokens_per_image=tokens_per_image,
        boi_token_index=tokenizer.convert_tokens_to_ids("<start_of_image>"),
        eoi_token_index=tokenizer.convert_tokens_to_ids("<end_of_image>"),
        image_token_index=tokenizer.convert_tokens_to_ids("<image_soft_token>"),
    )
    return _save(directory, config, processor, seed)


def build_qwen3_vl(
    directory: str | Path,
    *,
    max_pixels: int = 64 * 64,
    num_layers: int = 4,
    hidden_size: int = 64,
    seed: int = 0,
) -> Path:
    """Qwen3-VL: 8-pixel patches merged 2x2 (one placeholder per 16x16 pixels, at most
    ``max_pixels`` pixels per image), M-RoPE, DeepStack features injected into the first layer.

    Writes the model, the tokenizer (with the chat template) and the image processor; the full
    processor only when torchvision is installed (see the module docstring).
    """
    from transformers import Qwen3VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
    from transformers.utils import is_torchvision_available

    tokenizer = bpe_tokenizer(_QWEN_VL_SPECIALS, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = QWEN_VL_TEMPLATE
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": 16 * 16, "longest_edge": max_pixels}, patch_size=8, temporal_patch_size=2, merge_size=2
    )
    head_dim = hidden_size // 4
    half = head_dim // 2
    config = Qwen3VLConfig(
        text_config=dict(
            head_dim=head_dim,
            rope_parameters={
                "rope_type": "default", "rope_theta": 10000.0, "mrope_interleaved": True,
                "mrope_section": [half - 2 * (half // 4), half // 4, half // 4],
            },
            **language_model_kwargs(tokenizer, hidden_size=hidden_size, num_layers=num_layers),
        ),
        vision_config=dict(
            depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=8, spatial_merge_size=2,
            temporal_patch_size=2, out_hidden_size=hidden_size, num_position_embeddings=64,
            deepstack_visual_indexes=[0],
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tokenizer.convert_tokens_to_ids("<|vision_end|>"),
        tie_word_embeddings=False,
    )
    processor = None
    if is_torchvision_available():
        from transformers import Qwen3VLProcessor

        processor = Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, chat_template=QWEN_VL_TEMPLATE)
    path = _save(directory, config, processor, seed)
    if processor is None:
        tokenizer.save_pretrained(str(path))
        image_processor.save_pretrained(str(path))
    return path


def qwen3_vl_inputs(directory: str | Path, texts: list[str], images: list[list], *, image_processor=None):
    """Model inputs for a tiny Qwen3-VL without its processor: the image processor's tensors, each
    ``<|image_pad|>`` repeated once per merged patch of its image, and ``mm_token_type_ids``.

    Reproduces what ``Qwen3VLProcessor`` does for images, for model-level tests where the processor
    cannot be built (no torchvision); right padding, no special tokens added.
    """
    from transformers import AutoImageProcessor, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(directory))
    image_processor = image_processor or AutoImageProcessor.from_pretrained(str(directory))
    flat = [image for sample in images for image in sample]
    pixels = image_processor(images=flat, return_tensors="pt") if flat else {}
    counts = iter((pixels["image_grid_thw"].prod(-1) // image_processor.merge_size**2).tolist() if flat else [])
    expanded = []
    for text in texts:
        pieces = text.split("<|image_pad|>")
        expanded.append(pieces[0] + "".join("<|image_pad|>" * next(counts) + piece for piece in pieces[1:]))
    encoded = tokenizer(expanded, add_special_tokens=False, padding=True, return_tensors="pt")
    image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    inputs = {
        "input_ids": encoded["input_ids"],
        "attention_mask": encoded["attention_mask"],
        "mm_token_type_ids": (encoded["input_ids"] == image_id).long(),
    }
    if flat:
        inputs.update(pixel_values=pixels["pixel_values"], image_grid_thw=pixels["image_grid_thw"])
    return inputs


def vision_chat_rows(n: int, images: list[str], *, seed: int = 0) -> list[dict]:
    """``n`` image+text chats in the OpenAI parts layout, cycling through four shapes: one image,
    two images, text only, and two turns with an image in the first; ``images`` are the file names
    (relative to the data file) to draw from."""
    import random

    from kdlib.demo.text import CORPUS

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        question, answer, follow_up, answer2 = rng.sample(CORPUS, 4)
        picked = rng.sample(images, 2)
        image = [{"type": "image", "image": name} for name in picked]
        text = {"type": "text", "text": question}
        shape = i % 4
        if shape == 0:
            messages = [{"role": "user", "content": [image[0], text]}, _assistant(answer)]
        elif shape == 1:
            messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                        {"role": "user", "content": [image[0], {"type": "text", "text": "and"}, image[1], text]},
                        _assistant(answer)]
        elif shape == 2:
            messages = [{"role": "user", "content": [text]}, _assistant(answer)]
        else:
            messages = [{"role": "user", "content": [text, image[0]]}, _assistant(answer),
                        {"role": "user", "content": [{"type": "text", "text": follow_up}]}, _assistant(answer2)]
        rows.append({"id": i, "messages": messages})
    return rows


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": [{"type": "text", "text": text}]}


def make_image(width: int, height: int, seed: int = 0):
    """A deterministic RGB image: smooth gradients plus noise, so no two seeds look alike."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:height, 0:width]
    base = np.stack([xs / max(width - 1, 1), ys / max(height - 1, 1), (xs + ys) / max(width + height - 2, 1)], -1)
    pixels = 0.7 * base + 0.3 * rng.random((height, width, 3))
    return Image.fromarray((pixels * 255).astype("uint8"), mode="RGB")



def _save(directory: str | Path, config, processor: Optional[object], seed: int) -> Path:
    from transformers import AutoModelForImageTextToText

    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    random_model(AutoModelForImageTextToText, config, seed).save_pretrained(str(path))
    if processor is not None:
        processor.save_pretrained(str(path))
    return path
