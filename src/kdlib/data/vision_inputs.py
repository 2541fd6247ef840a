"""From image references to one model's pixel tensors, in the worker that runs the model.

A micro-batch travels with image references (:class:`~kdlib.batch.BatchImages`), never pixels:
each worker (teacher, student, rollout engine) opens the images and lets its own model's image
processor lay out the tensors (resolution, tiles, patches, normalisation), so a teacher and a
student with different preprocessing each get their own from the same message. Image processors
are deterministic, so this equals processing the batch in the controller (tested against the
processor's own batched call). Whatever the processor returns besides pixel tensors kdlib knows is
an error, never something silently left out of the model's inputs.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional

import torch

from kdlib.batch import PIXEL_KEYS, TokenBatch, VisionInputs
from kdlib.errors import ModelError

# Per-token modality ids (0 text, 1 image, ...) under the names processors give them:
# Qwen-VL's M-RoPE needs mm_token_type_ids; Gemma 3 attends bidirectionally within token_type_ids == 1.
TOKEN_TYPE_KEYS = ("mm_token_type_ids", "token_type_ids")


class ImageLayout:
    """One model's image processor, applied to batches of opened images."""

    def __init__(self, processor, *, name: str = "model") -> None:
        self.processor = processor
        self.name = name
        names = list(getattr(processor, "model_input_names", []))
        self.token_types_key: Optional[str] = next((key for key in TOKEN_TYPE_KEYS if key in names), None)
        self.model_input_names = set(names)

    def batch_images(self, images: list[list]) -> Optional[VisionInputs]:
        """Image tensors for a batch (``images[b]``: the opened images of sample b), laid out by the
        model's own image processor; None when no sample has an image."""
        if not any(images):
            return None
        out = self.processor.image_processor(images=images, return_tensors="pt")
        return self.image_inputs({k: v for k, v in out.items() if k in self.model_input_names})

    def image_inputs(self, tensors: dict[str, Any]) -> VisionInputs:
        """Processor outputs as :class:`VisionInputs`; an output kdlib does not know is an error."""
        unknown = sorted(set(tensors) - set(PIXEL_KEYS))
        if unknown:
            raise ModelError(
                f"the {self.name} processor ({type(self.processor).__name__}) returns {unknown}, which kdlib "
                f"does not pass to models (known: {list(PIXEL_KEYS)})"
            )
        return VisionInputs(**tensors, token_types_key=self.token_types_key)

    def pad_token_types(self, token_types: list[Optional[list[int]]], length: int, *, left: bool = False) -> Optional[torch.Tensor]:
        """Per-token modality ids of padded rows, [batch, length] (None if the model takes none);
        right padding, or left padding for generation prompts."""
        if self.token_types_key is None:
            return None
        out = torch.zeros((len(token_types), length), dtype=torch.long)
        for row, types in enumerate(token_types):
            if types:
                if left:
                    out[row, length - len(types):] = torch.tensor(types, dtype=torch.long)
                else:
                    out[row, : len(types)] = torch.tensor(types, dtype=torch.long)
        return out

    def attach(self, view: TokenBatch, *, idle_pixels: bool = False) -> TokenBatch:
        """``view`` with its images opened and processed into its :class:`VisionInputs` (the token
        types it carries are kept). ``idle_pixels``: a sharded student's micro-batch without images
        gets a blank image to run its vision tower on (see :attr:`VisionInputs.idle_pixels`)."""
        pixels = self.batch_images(view.images.open()) if view.images is not None else None
        vision = view.vision or VisionInputs(token_types_key=self.token_types_key)
        if pixels is not None:
            vision = replace(vision, **{key: getattr(pixels, key) for key in PIXEL_KEYS})
        elif idle_pixels:
            vision = replace(vision, idle_pixels=self.blank_image_inputs())
        return replace(view, vision=vision)

    def blank_image_inputs(self) -> VisionInputs:
        """Processor outputs for one small grey image (the idle pass of a sharded vision tower)."""
        from PIL import Image

        inputs = self.batch_images([[Image.new("RGB", (32, 32), (128, 128, 128))]])
        assert inputs is not None
        return inputs
