"""Image+text conversations -> one model's processor inputs, with the span of the trained response.

A vision-language model reads a sample through its own processor (``AutoProcessor``): its chat
template places an image placeholder where each image goes, and the processor expands every
placeholder into as many image tokens as that model's image preprocessing gives the image (tiles
for Idefics3/SmolVLM, merged patches for Qwen-VL, a fixed count for Gemma 3). A teacher and a
student with different resolutions therefore see different token ids for the same prompt, while
the response, which is text, is tokenised identically when they share a tokenizer.

The response span is found as for text (:mod:`kdlib.data.encoding`): the prompt is the template
rendered up to the assistant header, which must be a textual prefix of the whole rendering; the
prompt goes through the processor with the images, the response text through the tokenizer alone,
cut after the template's end-of-turn token. Whatever the processor returns besides token ids is
typed in :class:`VisionInputs` (pixel tensors and per-token modality ids); an output kdlib does not
know is an error rather than something silently not passed to the model.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, Optional

import torch

from kdlib.data.encoding import TurnTokens, end_of_turn_ids
from kdlib.data.multimodal import VisionConversation
from kdlib.errors import DataError, ModelError

# Per-token modality ids (0 text, 1 image, ...) under the names processors give them:
# Qwen-VL's M-RoPE needs mm_token_type_ids; Gemma 3 attends bidirectionally within token_type_ids == 1.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")
_TEXT_KEYS = ("input_ids", "attention_mask")


@dataclass
class VisionInputs:
    """A model's image inputs for one sample or a micro-batch, as its processor makes them.

    The pixel tensors keep the processor's layout: Qwen-VL concatenates the patches of all images
    (``pixel_values`` [patches, dim], ``image_grid_thw`` [images, 3]); Idefics3 pads a tile axis
    (``pixel_values`` [batch, tiles, 3, H, W] with ``pixel_attention_mask``); Gemma 3 and LLaVA
    stack images ([images, 3, H, W], LLaVA-NeXT adding ``image_sizes``). ``token_types`` is aligned
    with the token ids of the same view ([batch, length]) and passed as ``token_types_key``.
    """

    pixel_values: Optional[torch.Tensor] = None
    image_grid_thw: Optional[torch.Tensor] = None
    pixel_attention_mask: Optional[torch.Tensor] = None
    image_sizes: Optional[torch.Tensor] = None
    token_types: Optional[torch.Tensor] = None
    token_types_key: Optional[str] = None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward (absent tensors left out)."""
        out = {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in ("token_types", "token_types_key") and getattr(self, f.name) is not None
        }
        if self.token_types is not None:
            out[self.token_types_key] = self.token_types
        return out

    def to(self, device: torch.device | str, pixel_dtype: Optional[torch.dtype] = None) -> "VisionInputs":
        """On ``device``; ``pixel_values`` also cast to ``pixel_dtype`` when given."""

        def move(tensor: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if tensor is None else tensor.to(device)

        pixels = move(self.pixel_values)
        if pixels is not None and pixel_dtype is not None:
            pixels = pixels.to(pixel_dtype)
        return replace(
            self,
            pixel_values=pixels,
            image_grid_thw=move(self.image_grid_thw),
            pixel_attention_mask=move(self.pixel_attention_mask),
            image_sizes=move(self.image_sizes),
            token_types=move(self.token_types),
        )


_IMAGE_KEYS = tuple(f.name for f in fields(VisionInputs) if f.name not in ("token_types", "token_types_key"))


@dataclass
class VisionEncoding:
    """One model's tokens of a sample: prompt (image tokens expanded) + response, and its images."""

    input_ids: list[int]
    # Index of the first response token; the prompt is input_ids[:response_start].
    response_start: int
    # Per-token modality ids (None when the model takes none); 0 over the response.
    token_types: Optional[list[int]] = None
    # This sample's processed images (None without images).
    images: Optional[VisionInputs] = None

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.response_start:]

    def __len__(self) -> int:
        return len(self.input_ids)


class VisionChatEncoder(TurnTokens):
    """Renders and processes image+text conversations for one model."""

    def __init__(self, processor, *, name: str = "model") -> None:
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.name = name
        if not getattr(processor, "chat_template", None):
            raise DataError(f"the {name} processor has no chat template; set {name}.chat_template")
        self.image_token = getattr(processor, "image_token", None)
        if not self.image_token:
            raise ModelError(f"the {name} processor ({type(processor).__name__}) names no image token")
        self.end_of_turn_ids = end_of_turn_ids(self.tokenizer)
        if not self.end_of_turn_ids:
            raise DataError(f"the {name} tokenizer has no eos / end-of-turn token")
        # Ids that may only come from image expansion (a response holding one is an error).
        self.image_token_ids = {
            int(i)
            for i in (getattr(processor, "image_token_id", None), getattr(self.tokenizer, "image_token_id", None))
            if i is not None
        }
        names = list(getattr(processor, "model_input_names", []))
        self.token_types_key = next((key for key in TOKEN_TYPE_KEYS if key in names), None)
        self.model_input_names = set(names)

    def signature(self) -> tuple:
        """Equal signatures mean equal token ids and image tensors for every sample."""
        return (
            type(self.processor).__name__,
            *self.vocabulary_signature(),
            self.processor.chat_template,
            self.processor.to_json_string(),
        )

    def encode(self, conversation: VisionConversation, images: list, where: str) -> Optional[VisionEncoding]:
        """Prompt + last assistant turn; None when the response is empty (the caller counts it).

        ``images`` are the conversation's images, opened (PIL), in order.
        """
        turns = conversation.turns
        if not turns or turns[-1].role != "assistant":
            raise DataError(f"{where}: the conversation must end with an assistant message to train on")
        if turns[-1].n_images:
            raise DataError(f"{where}: the trained (last assistant) turn holds an image; only text can be trained")
        if not turns[-1].text.strip():
            return None
        prompt = conversation.without_response()
        prompt_text = self._render(prompt, generation_prompt=True)
        full_text = self._render(conversation, generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise DataError(
                f"{where}: the {self.name} chat template does not render the prompt as a prefix of "
                "the whole conversation, so the response tokens cannot be located"
            )
        encoded = self._process(prompt_text, images[: len(prompt.images)], where)
        response = self._ids(full_text[len(prompt_text):])
        response = self._through_end_of_turn(response)
        if self.image_token_ids.intersection(response):
            raise DataError(f"{where}: the response text contains the {self.name} image token; it cannot be trained")
        types = None if encoded.token_types is None else encoded.token_types + [0] * len(response)
        return VisionEncoding(encoded.input_ids + response, encoded.response_start, types, encoded.images)

    def encode_prompt(self, conversation: VisionConversation, images: list, where: str) -> VisionEncoding:
        """The generation prompt of a chat (a trailing assistant turn is left out), for rollouts."""
        prompt = conversation.without_response()
        return self._process(self._render(prompt, generation_prompt=True), images[: len(prompt.images)], where)

    def batch_images(self, images: list[list]) -> Optional[VisionInputs]:
        """Image tensors for a micro-batch (``images[b]``: the images of sample b, opened), laid out
        by the model's own image processor; None when no sample has an image."""
        if not any(images):
            return None
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return self._image_inputs({k: v for k, v in out.items() if k in self.model_input_names})

    def pad_token_types(self, token_types: list[Optional[list[int]]], length: int) -> Optional[torch.Tensor]:
        """Per-token modality ids of right-padded rows, [batch, length] (None if the model takes none)."""
        if self.token_types_key is None:
            return None
        out = torch.zeros((len(token_types), length), dtype=torch.long)
        for row, types in enumerate(token_types):
            if types:
                out[row, : len(types)] = torch.tensor(types, dtype=torch.long)
        return out

    def _render(self, conversation: VisionConversation, *, generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            conversation.template_messages(), tokenize=False, add_generation_prompt=generation_prompt
        )

    def _process(self, prompt_text: str, images: list, where: str) -> VisionEncoding:
        """The prompt through the processor: token ids with image tokens expanded, and the images."""
        placeholders = prompt_text.count(self.image_token)
        if placeholders != len(images):
            raise DataError(
                f"{where}: the {self.name} chat template renders {placeholders} image placeholders "
                f"for {len(images)} images"
            )
        try:
            out = self.processor(
                text=[prompt_text], images=[images] if images else None, add_special_tokens=False, return_tensors="pt"
            )
        except ValueError as exc:  # e.g. an image the processor cannot resize (extreme aspect ratio)
            raise DataError(f"{where}: the {self.name} processor rejects the sample: {_first_line(exc)}") from None
        ids = out["input_ids"][0].tolist()
        types = None
        if self.token_types_key is not None:
            given = out.get(self.token_types_key)
            types = given[0].tolist() if given is not None else [0] * len(ids)
        image_inputs = self._image_inputs({k: v for k, v in out.items() if k not in _TEXT_KEYS + TOKEN_TYPE_KEYS})
        return VisionEncoding(ids, len(ids), types, image_inputs if images else None)

    def _image_inputs(self, tensors: dict[str, Any]) -> VisionInputs:
        unknown = sorted(set(tensors) - set(_IMAGE_KEYS))
        if unknown:
            raise ModelError(
                f"the {self.name} processor ({type(self.processor).__name__}) returns {unknown}, which kdlib "
                f"does not pass to models (known: {list(_IMAGE_KEYS)})"
            )
        return VisionInputs(**tensors, token_types_key=self.token_types_key)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__
