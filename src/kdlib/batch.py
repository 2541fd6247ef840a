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
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Optional

import torch

if TYPE_CHECKING:
    from kdlib.xtok.groups import AlignmentBatch


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

    def __post_init__(self) -> None:
        shapes = [self.input_ids.shape, self.loss_mask.shape]
        shapes += [t.shape for t in (self.attention_mask, self.position_ids) if t is not None]
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

        return TokenBatch(move(self.input_ids), move(self.attention_mask), move(self.loss_mask), move(self.position_ids))


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

    def to(self, device: torch.device | str) -> "MicroBatch":
        def move(value):
            return None if value is None else value.to(device)

        return replace(
            self, student=self.student.to(device), teacher=move(self.teacher), alignment=move(self.alignment),
            teacher_rows=move(self.teacher_rows), response_bytes=move(self.response_bytes),
            teacher_response_bytes=move(self.teacher_response_bytes),
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
