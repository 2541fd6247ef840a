"""Held-out metrics that do not depend on a tokenizer: bits per byte and top-1 agreement.

Per-token cross-entropy and KL are not comparable across vocabularies (a model with longer tokens
has fewer, harder predictions). Bits per byte normalises by the text instead: the sum of the
negative log-likelihoods of a response's tokens, in bits, over the UTF-8 bytes of the response
text. The end-of-turn token is predicted by both models and its NLL is included (both must learn to
stop); its marker text is not counted in the bytes. Top-1 agreement is measured where it is
defined across vocabularies: at 1:1 groups, the student's and the teacher's most probable next
tokens agree when they are a matched pair of the sub-vocabulary (:mod:`kdlib.xtok.vocab`).
Everything is chunked over rows and returned as sums, so batches and workers add up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlib.models.head import LMHead
from kdlib.xtok.groups import AlignmentBatch, RowKind
from kdlib.xtok.vocab import VocabMatch


@dataclass
class BitsPerByteSums:
    """Additive sums behind bits per byte."""

    nll_nats: float = 0.0
    text_bytes: int = 0
    tokens: int = 0

    def add(self, other: "BitsPerByteSums") -> "BitsPerByteSums":
        return BitsPerByteSums(
            self.nll_nats + other.nll_nats, self.text_bytes + other.text_bytes, self.tokens + other.tokens
        )

    @property
    def bits_per_byte(self) -> float:
        return self.nll_nats / max(self.text_bytes, 1) / math.log(2)

    @property
    def tokens_per_byte(self) -> float:
        return self.tokens / max(self.text_bytes, 1)


@torch.no_grad()
def token_nll(hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, *, chunk_size: int = 1024) -> torch.Tensor:
    """Negative log-likelihood (nats) of each target, [N] float32 (float64 for float64 inputs)."""
    dtype = torch.float64 if head.weight.dtype == torch.float64 else torch.float32
    out = torch.empty(targets.shape[0], dtype=dtype, device=hidden.device)
    for start in range(0, targets.shape[0], chunk_size):
        stop = start + chunk_size
        logits = head.logits(hidden[start:stop]).to(dtype)
        out[start:stop] = F.cross_entropy(logits, targets[start:stop], reduction="none")
    return out


def bits_per_byte_sums(
    hidden: torch.Tensor, head: LMHead, targets: torch.Tensor, text_bytes: torch.Tensor, *, chunk_size: int = 1024
) -> BitsPerByteSums:
    """Sums over responses: ``hidden`` [N, H] at all loss rows, ``targets`` [N] the response tokens,
    ``text_bytes`` [B] the bytes of each response's text (``AlignmentBatch.text_bytes``)."""
    nll = token_nll(hidden, head, targets, chunk_size=chunk_size)
    return BitsPerByteSums(float(nll.sum()), int(text_bytes.sum()), int(targets.shape[0]))


@torch.no_grad()
def top1_agreement(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    alignment: AlignmentBatch,
    match: VocabMatch,
    *,
    chunk_size: int = 1024,
) -> tuple[int, int]:
    """(agreeing, compared) 1:1 groups. ``student_hidden`` holds all student loss rows,
    ``teacher_hidden`` the teacher rows ``alignment.rows(RowKind.pairs).teacher_rows``."""
    pairs = alignment.rows(RowKind.pairs)
    to_student = match.teacher_to_student(teacher_head.vocab_size).to(student_hidden.device)
    agree = 0
    for start in range(0, pairs.n_units, chunk_size):
        stop = start + chunk_size
        s_top = student_head.logits(student_hidden[pairs.student_start[start:stop]]).argmax(-1)
        t_top = teacher_head.logits(teacher_hidden[pairs.teacher_start[start:stop]]).argmax(-1)
        agree += int((to_student[t_top.to(to_student.device)] == s_top).sum())
    return agree, pairs.n_units
