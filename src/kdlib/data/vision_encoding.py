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

from dataclasses import dataclass
from typing import Optional

from kdlib.batch import VisionInputs
from kdlib.data.encoding import TurnTokens, end_of_turn_ids, template_errors
from kdlib.data.multimodal import VisionConversation
from kdlib.data.vision_inputs import TOKEN_TYPE_KEYS, ImageLayout
from kdlib.errors import DataError, ModelError, first_line

__all__ = ["VisionChatEncoder", "VisionEncoding", "VisionInputs"]

_TEXT_KEYS = ("input_ids", "attention_mask")


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


class VisionChatEncoder(ImageLayout, TurnTokens):
    """Renders and processes image+text conversations for one model."""

    def __init__(self, processor, *, name: str = "model") -> None:
        super().__init__(processor, name=name)
        self.tokenizer = processor.tokenizer
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

    @property
    def pretrained_files(self):
        """What is saved next to the model's weights (the processor: tokenizer, image processor,
        chat template), so the saved model loads with ``AutoProcessor``."""
        return self.processor

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
        with template_errors(self.name, where):
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
        with template_errors(self.name, where):
            text = self._render(prompt, generation_prompt=True)
        return self._process(text, images[: len(prompt.images)], where)

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
            raise DataError(f"{where}: the {self.name} processor rejects the sample: {first_line(exc)}") from None
        ids = out["input_ids"][0].tolist()
        types = None
        if self.token_types_key is not None:
            given = out.get(self.token_types_key)
            types = given[0].tolist() if given is not None else [0] * len(ids)
        image_inputs = self.image_inputs({k: v for k, v in out.items() if k not in _TEXT_KEYS + TOKEN_TYPE_KEYS})
        return VisionEncoding(ids, len(ids), types, image_inputs if images else None)

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
