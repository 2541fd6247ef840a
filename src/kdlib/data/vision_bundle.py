"""The data of an image+text run: :class:`~kdlib.data.bundle.DataBundle` for vision-language models.

Samples and prompts come from :mod:`kdlib.data.vision_samples`; a micro-batch carries image
references and each view's token types (:func:`~kdlib.data.vision_samples.collate_vision`); a
rollout's prompts travel to the generation engine with their images and token types; sampled
responses become samples that keep the prompt's images.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kdlib.batch import BatchImages, MicroBatch, PromptImages
from kdlib.config.schema import DataConfig
from kdlib.data.bundle import DataBundle
from kdlib.data.samples import FilterReport
from kdlib.data.vision_encoding import VisionChatEncoder
from kdlib.data.vision_samples import (
    VisionPrompt,
    VisionSample,
    build_vision_prompts,
    build_vision_samples,
    collate_vision,
    vision_rollout_sample,
)
from kdlib.errors import ConfigError


@dataclass
class VisionDataBundle(DataBundle):
    student_encoder: Optional[VisionChatEncoder] = None
    teacher_encoder: Optional[VisionChatEncoder] = None
    # data.max_image_pixels, checked again when a worker reopens an image.
    max_image_pixels: Optional[int] = None

    def load_samples(self, cfg: DataConfig, split: str) -> tuple[list[VisionSample], FilterReport]:
        return build_vision_samples(cfg, split, self.student_encoder, self.teacher_encoder)

    def load_prompts(self, cfg: DataConfig) -> tuple[list[VisionPrompt], FilterReport]:
        return build_vision_prompts(cfg, self.student_encoder, self.teacher_encoder)

    def collate(self, samples: list[VisionSample], *, packing: bool = False, training: bool = True) -> MicroBatch:
        if packing:
            raise ConfigError("train.packing=true is not supported for vision-language models; set train.packing=false")
        return collate_vision(samples, self.student_encoder, self.teacher_encoder, max_pixels=self.max_image_pixels)

    def rollout_images(self, prompts: list[VisionPrompt]) -> Optional[PromptImages]:
        if not any(prompt.images for prompt in prompts):
            return None
        images = BatchImages([list(p.images) for p in prompts], [p.where for p in prompts], self.max_image_pixels)
        return PromptImages(images, [p.student_types for p in prompts])

    def rollout_sample(self, prompt: VisionPrompt, response_ids: list[int], max_len: int) -> tuple[VisionSample, bool]:
        return vision_rollout_sample(prompt, response_ids, max_len)
