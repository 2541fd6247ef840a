"""Held-out metrics of a student against its teacher, computed without [tokens, vocab] peaks.

Per loss token: KL(teacher || student) at temperature 1 over the common vocabulary, the student's
cross-entropy on the dataset token, whether the student's and the teacher's top-1 tokens agree,
and the student's **expected calibration error** (ECE: its top-1 probability against how often
its top-1 token is the dataset's, in 15 equal-width bins of confidence, weighted by the tokens in
each; Guo et al. 2017). With a top-k or sampled teacher signal the teacher's whole distribution is
not known: KL is then the signal's own forward-KL estimate (``signal_kl``, see
:mod:`kdlib.losses.estimators`), top-1 agreement is measured against the teacher's first top-k
token, and the teacher's bits per byte are not measured.
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
from dataclasses import dataclass, field, fields

import torch
import torch.nn.functional as F

from kdlib.losses.divergences import kl_from_log_probs
from kdlib.models.head import LMHead
from kdlib.teacher_output import TeacherOutput
from kdlib.xtok.groups import AlignmentBatch, RowKind
from kdlib.xtok.metrics import token_nll, top1_agreement
from kdlib.xtok.vocab import VocabMatch

# Equal-width bins of confidence for the expected calibration error (as in Guo et al. 2017).
ECE_BINS = 15


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
    # Sum of a sparse signal's forward-KL estimate over signal_kl_tokens tokens.
    signal_kl: float = 0.0
    signal_kl_tokens: int = 0
    # Calibration per bin of the student's top-1 probability: tokens, summed top-1 probability,
    # tokens whose top-1 is the dataset token.
    ece_tokens: list = field(default_factory=lambda: [0] * ECE_BINS)
    ece_confidence: list = field(default_factory=lambda: [0.0] * ECE_BINS)
    ece_correct: list = field(default_factory=lambda: [0] * ECE_BINS)

    def add(self, other: "HeldoutSums") -> "HeldoutSums":
        def plus(a, b):
            return [x + y for x, y in zip(a, b)] if isinstance(a, list) else a + b

        return HeldoutSums(**{f.name: plus(getattr(self, f.name), getattr(other, f.name)) for f in fields(self)})

    def add_calibration(self, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """Count the student's top-1 probability and correctness of each row into the ECE bins."""
        confidence, top = torch.softmax(logits.float(), -1).max(-1)
        bins = (confidence * ECE_BINS).long().clamp_(max=ECE_BINS - 1)
        correct = (top == targets.to(top.device)).long()
        for name, values in (("ece_tokens", torch.ones_like(bins)), ("ece_confidence", confidence.double()),
                             ("ece_correct", correct)):
            totals = torch.zeros(ECE_BINS, dtype=values.dtype).index_add_(0, bins.cpu(), values.cpu()).tolist()
            setattr(self, name, [a + b for a, b in zip(getattr(self, name), totals)])

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
        if sum(self.ece_tokens):
            gaps = (abs(c - p) for c, p in zip(self.ece_correct, self.ece_confidence))
            out["ece"] = sum(gaps) / sum(self.ece_tokens)
        if self.signal_kl_tokens:
            out["signal_kl"] = self.signal_kl / self.signal_kl_tokens
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
        sums.add_calibration(s_logits, targets[start:stop])
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
def signal_heldout_sums(
    student_hidden: torch.Tensor, student_head: LMHead, teacher: TeacherOutput, targets: torch.Tensor, *,
    chunk_size: int = 1024,
) -> HeldoutSums:
    """Same tokenizer, a top-k or sampled teacher signal at the student's loss rows: the student's
    CE and calibration, the signal's forward-KL estimate, top-1 agreement with the top-k's first."""
    from kdlib.losses.estimators import sampled_estimate, topk_estimate

    n = int(targets.shape[0])
    teacher.check_rows(n)
    sums = HeldoutSums(tokens=n, signal_kl_tokens=n)
    topk = teacher.signal == "topk"
    if topk:
        sums.top1_compared = n
    for start in range(0, n, chunk_size):
        rows = slice(start, start + chunk_size)
        s_logits = student_head.logits(student_hidden[rows]).float()
        sums.ce += F.cross_entropy(s_logits, targets[rows], reduction="sum").item()
        sums.add_calibration(s_logits, targets[rows])
        part = teacher.select_rows(rows)
        if topk:
            kl = topk_estimate("kl", s_logits, part["topk_ids"], part["topk_logprobs"], part.get("topk_tail"))
            sums.top1_agree += (s_logits.argmax(-1) == part["topk_ids"][:, 0].long()).sum().item()
        else:
            kl = sampled_estimate("kl", s_logits, part["sampled_ids"], part["sampled_logprobs"], part.get("sampled_proposal"))
        sums.signal_kl += kl.sum().item()
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
    sums = HeldoutSums(
        ce=float(token_nll(student_hidden, student_head, student_ids, chunk_size=chunk_size).sum()),
        tokens=int(student_ids.shape[0]),
        top1_agree=float(agree), top1_compared=compared,
        teacher_nll=float(token_nll(teacher_hidden, teacher_head, teacher_ids, chunk_size=chunk_size).sum()),
        teacher_tokens=int(teacher_ids.shape[0]),
    )
    for start in range(0, student_ids.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        sums.add_calibration(student_head.logits(student_hidden[rows]), student_ids[rows])
    return sums
