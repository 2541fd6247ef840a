"""A carrier field type of the tests' own, registered as a plugin registers one.

``TeacherOutput.from_parts`` builds only the dataclass types registered in
``kdlib.teacher_output.CARRIER_TYPES``; :class:`ExampleAlignment` stands in for a method's
alignment object so that transport tests can move a carrier with every field set. Importing this
module registers it (Ray actors import it too: tests/ is on their path).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.teacher_output import CARRIER_TYPES, TeacherOutput


@dataclass
class ExampleAlignment:
    """A dataclass of tensors standing in for a method's alignment object in transport tests."""

    teacher_rows: torch.Tensor
    student_rows: torch.Tensor
    weights: torch.Tensor


CARRIER_TYPES.register("example_alignment", ExampleAlignment)


def full_teacher_output(signal: str = "hidden") -> TeacherOutput:
    """A teacher output with every carrier field of ``signal`` set (random, non-zero, in the wire
    dtypes), for transport tests: hidden, topk (with its tail) or sampled (with its proposal)."""
    g = torch.Generator().manual_seed(7)
    rows, k = 9, 3
    logprobs = torch.log_softmax(torch.randn(rows, 50, generator=g), -1)[:, :k]
    fields = {
        "hidden": dict(hidden=torch.randn(rows, 24, generator=g).to(torch.bfloat16)),
        "topk": dict(topk_ids=torch.randint(0, 1000, (rows, k), generator=g).to(torch.uint16),
                     topk_logprobs=logprobs, topk_tail=torch.log1p(-logprobs.exp().sum(-1))),
        "sampled": dict(sampled_ids=torch.randint(0, 70000, (rows, k), generator=g).to(torch.int32),
                        sampled_logprobs=logprobs, sampled_proposal=logprobs - torch.rand(rows, k, generator=g)),
    }[signal]
    return TeacherOutput(
        row_offsets=torch.tensor([0, 4, 4, 9]),
        sample_ids=torch.tensor([11, 5, 30]),
        alignment=ExampleAlignment(
            teacher_rows=torch.arange(rows), student_rows=torch.randint(0, rows, (rows,), generator=g),
            weights=torch.rand(rows, generator=g, dtype=torch.float64),
        ),
        **fields,
    )
