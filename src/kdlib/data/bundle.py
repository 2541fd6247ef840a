"""The tokenised data of a run and what it takes to batch it."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from kdlib.batch import MicroBatch
from kdlib.data.batching import collate
from kdlib.data.encoding import ChatEncoder
from kdlib.data.samples import FilterReport, Prompt, Sample


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

    def collate(self, samples: list[Sample], *, packing: bool = False) -> MicroBatch:
        return collate(
            samples, student_pad_id=self.student_pad_id, teacher_pad_id=self.teacher_pad_id, packing=packing
        )
