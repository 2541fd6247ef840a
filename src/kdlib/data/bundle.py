"""The tokenised data of a run and what it takes to batch it.

A :class:`DataBundle` is also the one place that knows whether the run's samples are text or
image+text: it loads samples and prompts, collates micro-batches, describes a rollout's prompts to
the generation engine and turns sampled responses into samples. :class:`VisionDataBundle`
(:mod:`kdlib.data.vision_bundle`) does the same for vision-language models, so the modes never
branch on the modality.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from kdlib.batch import MicroBatch, PromptImages
from kdlib.config.schema import DataConfig, TrainConfig
from kdlib.data.batching import StepPlan, collate, micro_batches, plan_step
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import FilterReport, Prompt, Sample, build_prompts, build_samples, rollout_sample

if TYPE_CHECKING:
    from kdlib.data.cross_tokenizer import ResponseAligner
    from kdlib.xtok.groups import RowKind


@dataclass
class DataBundle:
    """Tokenised samples (train/eval), prompts (on-policy) and the reports of what was filtered."""

    student_pad_id: int
    teacher_pad_id: Optional[int]
    train: list[Sample] = field(default_factory=list)
    eval: list[Sample] = field(default_factory=list)
    reports: dict[str, FilterReport] = field(default_factory=dict)
    # mode=onpolicy: the prompts the student answers, and the student's chat encoder (end tokens)
    prompts: list[Prompt] = field(default_factory=list)
    student_encoder: Optional[ChatEncoder] = None
    # Cross-tokenizer algorithms: aligns the two tokenisations of every sample and rollout.
    aligner: Optional["ResponseAligner"] = None
    # The teacher rows the algorithm reads in training (None: all loss rows).
    row_kind: Optional["RowKind"] = None
    # The teacher's chat encoder when it renders samples differently from the student (else None).
    teacher_encoder: Optional[ChatEncoder] = None

    def load_samples(self, cfg: DataConfig, split: str) -> tuple[list[Sample], FilterReport]:
        """The samples of ``split`` ("train" or "eval") as the run's encoders render them."""
        return build_samples(cfg, split, self.student_encoder, self.teacher_encoder, self.aligner)

    def load_prompts(self, cfg: DataConfig) -> tuple[list[Prompt], FilterReport]:
        """The prompts of data.train (on-policy)."""
        return build_prompts(cfg, self.student_encoder, self.teacher_encoder)

    def collate(self, samples: list[Sample], *, packing: bool = False, training: bool = True) -> MicroBatch:
        """A micro-batch of ``samples``; the teacher sends only the rows the algorithm reads in
        ``training`` batches, every loss row in evaluation batches (for its bits per byte)."""
        return collate(
            samples, student_pad_id=self.student_pad_id, teacher_pad_id=self.teacher_pad_id, packing=packing,
            row_kind=self.row_kind if training else None,
        )

    def rollout_images(self, prompts: list[Prompt]) -> Optional[PromptImages]:
        """What the generation engine needs besides the prompts' token ids (nothing for text)."""
        return None

    def rollout_sample(self, prompt: Prompt, response_ids: list[int], max_len: int) -> tuple[Sample, bool]:
        """A training sample from a sampled response (see :func:`kdlib.data.samples.rollout_sample`)."""
        return rollout_sample(prompt, response_ids, max_len, encoder=self.student_encoder, aligner=self.aligner)

    def step_batches(self, samples: list[Sample], train: TrainConfig, n_workers: int) -> tuple[StepPlan, list[MicroBatch]]:
        """A global batch planned over ``n_workers`` and collated, as a training step runs it (the
        teacher cache fill plans the same way, so it sees the same micro-batches)."""
        assert isinstance(train.packing, bool), "train.packing=auto is settled by assembly.chat_encoders first"
        plan = plan_step(
            samples, n_workers, micro_batch_size=train.micro_batch_size,
            max_tokens=train.max_tokens_per_micro_batch, packing=train.packing,
        )
        return plan, [self.collate(chunk, packing=train.packing) for chunk in plan.micro_batches]

    def eval_batches(self, batch_size: int) -> list[MicroBatch]:
        """The held-out micro-batches, as every evaluation (and the cache fill) forms them."""
        return [self.collate(chunk, training=False) for chunk in micro_batches(self.eval, batch_size)]
