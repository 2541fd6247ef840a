"""Generation about images: the transformers rollout backend's path for vision-language students.

On-policy KD with images has the student answer questions about pictures: each prompt's token ids
(image tokens expanded at the student's resolution) come with its images (references) and its
per-token modality ids. A batch of prompts is left-padded (ids, attention mask and token types
alike), its images are opened and laid out by the model's own processor, and the backend's model
(the same copy of the student that weight syncs update) samples with ``model.generate`` and the
same settings as the text path. The responses are text; the teacher later scores the same ids
after its own rendering of the prompt, with the same images at its own resolution.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from kdlib.batch import BatchImages, PromptImages, VisionInputs
from kdlib.backends.base import Generation
from kdlib.backends.hf.rollout import HFRolloutBackend, generate_kwargs, generate_with_logprobs, left_pad, until_stop
from kdlib.errors import ModelError
from kdlib.models.vlm import image_layout_for


class HFImageGeneration:
    """Generation about images with an :class:`~kdlib.backends.hf.rollout.HFRolloutBackend`'s model."""

    def __init__(self, backend: HFRolloutBackend) -> None:
        self.backend = backend
        self.images = image_layout_for(backend.model_cfg, backend.model, name="rollout")
        if self.images is None:
            raise ModelError(f"{backend.model_cfg.model!r} is a text-only model; it cannot generate about images")

    @torch.inference_mode()
    def generate(
        self, prompts: list[list[int]], images: PromptImages, *, stop_ids: set[int], pad_id: int, seed: int,
        logprobs: bool = False,
    ) -> list[list[Generation]]:
        """``cfg.n_samples_per_prompt`` generations per prompt about its images, in prompt order."""
        model, device, cfg = self.backend.model, self.backend.device, self.backend.cfg
        n = cfg.n_samples_per_prompt
        repeated = [(i, p) for i, p in enumerate(prompts) for _ in range(n)]
        per_sample = images.repeat(n)
        kwargs = generate_kwargs(cfg, stop_ids=stop_ids, pad_id=pad_id)
        out: list[list[Generation]] = [[] for _ in prompts]
        torch.manual_seed(seed)
        for start in range(0, len(repeated), cfg.batch_size):
            chunk = repeated[start : start + cfg.batch_size]
            ids, attention = left_pad([p for _, p in chunk], pad_id)
            vision = self._inputs(per_sample, start, start + len(chunk), ids.shape[1])
            extra = {} if vision is None else vision.to(device, pixel_dtype=model.dtype).model_kwargs()
            sequences, scores = generate_with_logprobs(model, ids.to(device), attention.to(device), kwargs,
                                                       logprobs, cfg.temperature, **extra)
            for row, ((prompt_index, _), tokens) in enumerate(zip(chunk, sequences[:, ids.shape[1]:].tolist())):
                out[prompt_index].append(until_stop(tokens, stop_ids, None if scores is None else scores[row].tolist()))
        return out

    def _inputs(self, prompts: PromptImages, start: int, stop: int, length: int) -> Optional[VisionInputs]:
        """Pixel tensors and left-padded token types of prompts ``start:stop``."""
        refs = prompts.images
        opened = BatchImages(refs.refs[start:stop], refs.where[start:stop], refs.max_pixels).open()
        vision = self.images.batch_images(opened)
        types = self.images.pad_token_types(prompts.token_types[start:stop], length, left=True)
        if types is not None:
            vision = replace(vision or VisionInputs(token_types_key=self.images.token_types_key), token_types=types)
        return vision
