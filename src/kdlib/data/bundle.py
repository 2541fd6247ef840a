"""The tokenised data of a run and what it takes to batch it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from kdlib.batch import MicroBatch
from kdlib.config.schema import TrainConfig
from kdlib.data.batching import StepPlan, collate, micro_batches, plan_step
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import FilterReport, Prompt, Sample

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

    def collate(self, samples: list[Sample], *, packing: bool = False, training: bool = True) -> MicroBatch:
        """A micro-batch of ``samples``; the teacher sends only the rows the algorithm reads in
        ``training`` batches, every loss row in evaluation batches (for its bits per byte)."""
        return collate(
            samples, student_pad_id=self.student_pad_id, teacher_pad_id=self.teacher_pad_id, packing=packing,
            row_kind=self.row_kind if training else None,
        )

    def step_batches(self, samples: list[Sample], train: TrainConfig, n_workers: int) -> tuple[StepPlan, list[MicroBatch]]:
        """A global batch planned over ``n_workers`` and collated, as a training step runs it (the
        teacher cache fill plans the same way, so it sees the same micro-batches)."""
        plan = plan_step(
            samples, n_workers, micro_batch_size=train.micro_batch_size,
            max_tokens=train.max_tokens_per_micro_batch, packing=train.packing,
        )
        return plan, [self.collate(chunk, packing=train.packing) for chunk in plan.micro_batches]

    def eval_batches(self, batch_size: int) -> list[MicroBatch]:
        """The held-out micro-batches, as every evaluation (and the cache fill) forms them."""
        return [self.collate(chunk, training=False) for chunk in micro_batches(self.eval, batch_size)]
