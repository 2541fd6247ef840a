"""Typed batches: what travels from the data loader to the workers, and from teacher to student.

A :class:`TokenBatch` is one model's view of a micro-batch (right-padded ids, attention mask and a
loss mask). A :class:`MicroBatch` pairs the student's view with the teacher's own view when the
teacher reads different tokens (another chat template, a privileged prompt); otherwise the teacher
reads the student's. The teacher's answer is a :class:`~kdlib.teacher_output.TeacherOutput`: hidden
states at the loss positions in row-major (sample, position) order, the order in which the student
gathers its own, so row i of both refers to the same predicted token.

Loss-mask convention: ``loss_mask[b, t]`` is True when the hidden state at position t is trained to
predict token ``input_ids[b, t + 1]`` (a response token), so no label shifting happens anywhere else.

Across tokenizers a micro-batch also carries the byte-offset groups of its samples
(:class:`~kdlib.xtok.groups.AlignmentBatch`) and the teacher loss rows the algorithm reads, so the
teacher sends only those.

Image+text batches (vision-language models) carry their images as references
(:class:`BatchImages`), not pixels: the worker that runs a model opens them and lays out the pixel
tensors with that model's own processor (:mod:`kdlib.data.vision_inputs`), filling the view's
:class:`VisionInputs`. Each view's per-token modality ids come from collation, aligned with its ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from kdlib.xtok.groups import AlignmentBatch
    from kdlib.data.images import ImageRef
    from kdlib.routing import Route


@dataclass
class VisionInputs:
    """A vision-language model's image inputs for one view of a micro-batch, as its processor makes them.

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
    # A sharded (FSDP2) student only: pixel inputs of one blank image that no token refers to. When
    # the micro-batch has no image, the vision tower runs on them anyway (contributing exactly 0),
    # so every rank gathers the vision blocks' shards in the same order (see kdlib.models.vlm).
    idle_pixels: Optional["VisionInputs"] = None

    @property
    def has_images(self) -> bool:
        return self.pixel_values is not None

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for the model's forward (absent tensors left out)."""
        out = {name: getattr(self, name) for name in PIXEL_KEYS if getattr(self, name) is not None}
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
            idle_pixels=None if self.idle_pixels is None else self.idle_pixels.to(device, pixel_dtype),
        )


# The processor outputs passed to a model besides token ids and token types.
PIXEL_KEYS = tuple(f.name for f in fields(VisionInputs) if f.name not in ("token_types", "token_types_key", "idle_pixels"))


@dataclass
class BatchImages:
    """The images of a micro-batch's samples, as references: what travels from the controller to
    the workers (each opens them with its own processor). Shared by the student's and the
    teacher's view: the same pictures, laid out at each model's own resolution."""

    # refs[b]: the images of sample b, in the order of its image tokens (empty for text-only samples).
    refs: list[list["ImageRef"]]
    # where[b]: '<key>: <file>, row <n>' of sample b, for errors when an image is opened again.
    where: list[str]
    # data.max_image_pixels (None: no limit).
    max_pixels: Optional[int] = None

    @property
    def count(self) -> int:
        return sum(len(refs) for refs in self.refs)

    def open(self) -> list[list]:
        """The images as RGB PIL images, per sample."""
        from kdlib.data.images import open_image

        return [[open_image(ref, where, self.max_pixels) for ref in refs] for refs, where in zip(self.refs, self.where)]

    def repeat(self, times: int) -> "BatchImages":
        """Each sample's images ``times`` times in a row (prompts sampled several times)."""
        return BatchImages(
            [refs for refs in self.refs for _ in range(times)],
            [where for where in self.where for _ in range(times)],
            self.max_pixels,
        )


@dataclass
class PromptImages:
    """The images of a batch of generation prompts (on-policy rollouts of a vision-language student),
    aligned with the prompts' token ids."""

    images: BatchImages
    # token_types[b]: prompt b's per-token modality ids (None when the model takes none).
    token_types: list[Optional[list[int]]]

    def repeat(self, times: int) -> "PromptImages":
        return PromptImages(self.images.repeat(times), [t for t in self.token_types for _ in range(times)])


@dataclass
class TokenBatch:
    """One model's view of a micro-batch; all tensors are [batch, length].

    Padded form: right-padded rows and an ``attention_mask``. Packed form (no padding): one row of
    concatenated sequences, ``position_ids`` restarting at 0 for each, ``attention_mask=None``;
    transformers then keeps attention inside each sequence.
    """

    input_ids: torch.Tensor  # long
    attention_mask: Optional[torch.Tensor]  # long, 1 = real token, right padding; None when packed
    loss_mask: torch.Tensor  # bool, position t predicts input_ids[:, t + 1]
    position_ids: Optional[torch.Tensor] = None  # long; given for packed batches
    # Image+text batches: the images of the samples (references), None for text.
    images: Optional[BatchImages] = None
    # A vision-language model's inputs for this view: per-token modality ids from collation and,
    # once the worker running the model has opened the images, the pixel tensors. None for text.
    vision: Optional[VisionInputs] = None

    def __post_init__(self) -> None:
        shapes = [self.input_ids.shape, self.loss_mask.shape]
        shapes += [t.shape for t in (self.attention_mask, self.position_ids) if t is not None]
        if self.vision is not None and self.vision.token_types is not None:
            shapes.append(self.vision.token_types.shape)
        if len(set(shapes)) != 1:
            raise ValueError(f"TokenBatch tensors differ in shape: {[tuple(s) for s in shapes]}")

    @property
    def packed(self) -> bool:
        return self.attention_mask is None

    @property
    def n_loss_tokens(self) -> int:
        return int(self.loss_mask.sum())

    @property
    def n_tokens(self) -> int:
        return self.input_ids.numel() if self.attention_mask is None else int(self.attention_mask.sum())

    def loss_rows_per_sample(self) -> torch.Tensor:
        """[n_samples] loss positions of each sample, in order (packed rows hold several samples,
        each starting where ``position_ids`` is 0)."""
        if not self.packed:
            return self.loss_mask.sum(dim=1)
        starts = (self.position_ids == 0).reshape(-1)
        segment = torch.cumsum(starts.long(), 0) - 1
        return torch.bincount(segment[self.loss_mask.reshape(-1)], minlength=int(starts.sum()))

    def targets(self) -> torch.Tensor:
        """Next-token ids at the loss positions, [n_loss_tokens]."""
        shifted = torch.roll(self.input_ids, shifts=-1, dims=1)
        return shifted[self.loss_mask]

    def to(self, device: torch.device | str) -> "TokenBatch":
        def move(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
            return None if t is None else t.to(device)

        return replace(
            self, input_ids=move(self.input_ids), attention_mask=move(self.attention_mask),
            loss_mask=move(self.loss_mask), position_ids=move(self.position_ids),
            vision=None if self.vision is None else self.vision.to(device),
        )


@dataclass
class MicroBatch:
    """The unit of a forward/backward pass: the student's tokens and, if different, the teacher's."""

    student: TokenBatch
    # The teacher's own tokens; None when it reads exactly the student's.
    teacher: Optional[TokenBatch] = None
    # Indices of the samples in their dataset, for error messages and rollout logs.
    sample_ids: list[int] = field(default_factory=list)
    # Content keys of the teacher's view of each sample (token ids + trained span; see
    # kdlib.cache.fingerprint.sample_key), the identity a teacher cache files outputs under.
    # None for samples that are never cached (fresh on-policy rollouts).
    teacher_keys: Optional[list[str]] = None
    # Cross-tokenizer algorithms: the byte-offset groups of the samples, in order.
    alignment: Optional["AlignmentBatch"] = None
    # The teacher loss rows the algorithm reads (sorted; the teacher sends only these); None = all.
    teacher_rows: Optional[torch.Tensor] = None
    # [n_samples] long: UTF-8 bytes of response text the student's kept tokens spell (the
    # denominator of bits per byte), and the teacher's (None: the same tokens, the same bytes).
    response_bytes: Optional[torch.Tensor] = None
    teacher_response_bytes: Optional[torch.Tensor] = None
    # Several teachers: the teacher or ensemble these samples go to, or the parts of a micro-batch
    # holding several (kdlib.routing); None otherwise.
    route: Optional["Route"] = None
    # On-policy with a reward: float32 [n_loss_tokens], each loss row its sample's group-normalised
    # advantage (kdlib.rewards.advantages), in loss-row order; None without a reward.
    advantages: Optional[torch.Tensor] = None
    # On-policy: [n_loss_tokens] float32, the rollout engine's log-probability of each loss row's
    # target (the sampled token), NaN for rows it did not sample; None when no sample has them.
    rollout_logprobs: Optional[torch.Tensor] = None

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(value):
            return None if value is None else value.to(device)

        return replace(
            self, student=self.student.to(device), teacher=move(self.teacher), alignment=move(self.alignment),
            teacher_rows=move(self.teacher_rows), response_bytes=move(self.response_bytes),
            teacher_response_bytes=move(self.teacher_response_bytes), route=move(self.route),
            advantages=move(self.advantages),
            rollout_logprobs=move(self.rollout_logprobs),
        )

    @property
    def teacher_view(self) -> TokenBatch:
        return self.teacher if self.teacher is not None else self.student

    @property
    def n_loss_tokens(self) -> int:
        return self.student.n_loss_tokens

    @property
    def n_tokens(self) -> int:
        return self.student.n_tokens


@dataclass
class ScoredSample:
    """One sample of a token batch as an inference server sees it: unpadded ids and its loss positions."""

    input_ids: list[int]
    loss_positions: torch.Tensor  # long, ascending


def split_samples(batch: TokenBatch) -> list[ScoredSample]:
    """The samples of a padded or packed batch, in the order of the batch's loss rows."""
    samples = []
    for row in range(batch.input_ids.shape[0]):
        ids, loss = batch.input_ids[row].cpu(), batch.loss_mask[row].cpu()
        if batch.packed:
            starts = (batch.position_ids[row].cpu() == 0).nonzero().flatten().tolist()
            bounds = list(zip(starts, starts[1:] + [ids.numel()]))
        else:
            bounds = [(0, int(batch.attention_mask[row].sum()))]  # right padding
        for start, stop in bounds:
            samples.append(ScoredSample(ids[start:stop].tolist(), loss[start:stop].nonzero().flatten()))
    return samples
