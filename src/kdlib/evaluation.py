"""Held-out metrics of a student against its teacher, computed without [tokens, vocab] peaks.

Per loss token: KL(teacher || student) at temperature 1 over the common vocabulary, the student's
cross-entropy on the dataset token, and whether the student's and the teacher's top-1 tokens agree.
Per response, for every run: **bits per byte** of the response text for the student and the
teacher (the sum of the response tokens' negative log-likelihoods over the UTF-8 bytes of the text
they spell, in bits), the measure that stays comparable when the two tokenise differently. Across
tokenizers (:func:`cross_tokenizer_heldout_sums`) KL per token is not defined; top-1 agreement is
measured at 1:1 groups through the matched vocabulary (:mod:`kdlib.xtok.metrics`).

Chunked over tokens so evaluating long sequences with a large vocabulary stays within
``chunk_size x vocab`` floats; the sums are returned so batches and workers can be added up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from kdlib.losses.divergences import kl_from_log_probs
from kdlib.models.head import LMHead
from kdlib.xtok.groups import AlignmentBatch, RowKind
from kdlib.xtok.metrics import token_nll, top1_agreement
from kdlib.xtok.vocab import VocabMatch


@dataclass
class HeldoutSums:
    """Additive held-out statistics (a metric is reported only where it was measured)."""

    # Sum of KL(teacher || student) over kl_tokens tokens (same tokenizer only).
    kl: float = 0.0
    kl_tokens: int = 0
    # Sum of the student's cross-entropy (NLL, nats) over its `tokens` loss tokens.
    ce: float = 0.0
    tokens: int = 0
    # Top-1 agreement: agreeing predictions among `top1_compared` (tokens, or 1:1 groups).
    top1_agree: float = 0.0
    top1_compared: int = 0
    # Sum of the teacher's NLL (nats) over its own `teacher_tokens` response tokens.
    teacher_nll: float = 0.0
    teacher_tokens: int = 0
    # UTF-8 bytes of the response text the student's / the teacher's tokens spell.
    student_bytes: int = 0
    teacher_bytes: int = 0

    def add(self, other: "HeldoutSums") -> "HeldoutSums":
        return HeldoutSums(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def means(self) -> dict[str, float]:
        out: dict[str, float] = {}
        if self.kl_tokens:
            out["kl"] = self.kl / self.kl_tokens
        out["ce"] = self.ce / max(self.tokens, 1)
        if self.top1_compared:
            out["top1_agreement"] = self.top1_agree / self.top1_compared
        if self.student_bytes:
            out["bits_per_byte"] = self.ce / self.student_bytes / math.log(2)
        if self.teacher_tokens and self.teacher_bytes:
            out["teacher_bits_per_byte"] = self.teacher_nll / self.teacher_bytes / math.log(2)
        out["tokens"] = self.tokens
        return out


@torch.no_grad()
def heldout_sums(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor | None,
    teacher_head: LMHead | None,
    targets: torch.Tensor,
    *,
    chunk_size: int = 1024,
) -> HeldoutSums:
    """Same tokenizer: teacher and student hidden states at the same loss rows, one target each."""
    n = int(targets.shape[0])
    sums = HeldoutSums(tokens=n)
    with_teacher = teacher_hidden is not None and teacher_head is not None
    if with_teacher:
        sums.kl_tokens = sums.top1_compared = sums.teacher_tokens = n
    for start in range(0, n, chunk_size):
        stop = start + chunk_size
        s_logits = student_head.logits(student_hidden[start:stop]).float()
        sums.ce += F.cross_entropy(s_logits, targets[start:stop], reduction="sum").item()
        if not with_teacher:
            continue
        t_logits = teacher_head.logits(teacher_hidden[start:stop].to(teacher_head.weight.device)).float()
        sums.teacher_nll += F.cross_entropy(t_logits, targets[start:stop].to(t_logits.device), reduction="sum").item()
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])
        s_common, t_common = s_logits[:, :vocab], t_logits[:, :vocab]
        sums.kl += kl_from_log_probs(F.log_softmax(t_common, -1), F.log_softmax(s_common, -1)).sum().item()
        sums.top1_agree += (s_common.argmax(-1) == t_common.argmax(-1)).sum().item()
    return sums


@torch.no_grad()
def cross_tokenizer_heldout_sums(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher_hidden: torch.Tensor,
    teacher_head: LMHead,
    alignment: AlignmentBatch,
    match: VocabMatch,
    *,
    chunk_size: int = 1024,
) -> HeldoutSums:
    """Across tokenizers: ``student_hidden`` at every student loss row, ``teacher_hidden`` at
    every teacher loss row; each side's NLL of its own response tokens, top-1 agreement at 1:1
    groups."""
    if teacher_hidden.shape[0] != alignment.n_teacher_rows:
        raise ValueError(
            f"held-out evaluation needs the teacher's {alignment.n_teacher_rows} loss rows, got {teacher_hidden.shape[0]}"
        )
    student_ids = alignment.student_ids.to(student_hidden.device)
    teacher_ids = alignment.teacher_ids.to(teacher_hidden.device)
    pairs = alignment.rows(RowKind.pairs).teacher_rows
    agree, compared = top1_agreement(
        student_hidden, student_head, teacher_hidden[pairs.to(teacher_hidden.device)], teacher_head, alignment, match,
        chunk_size=chunk_size,
    )
    return HeldoutSums(
        ce=float(token_nll(student_hidden, student_head, student_ids, chunk_size=chunk_size).sum()),
        tokens=int(student_ids.shape[0]),
        top1_agree=float(agree), top1_compared=compared,
        teacher_nll=float(token_nll(teacher_hidden, teacher_head, teacher_ids, chunk_size=chunk_size).sum()),
        teacher_tokens=int(teacher_ids.shape[0]),
    )
