"""Held-out metrics of a student against its teacher, computed without [tokens, vocab] peaks.

Per loss token: KL(teacher || student) at temperature 1 over the common vocabulary, the student's
cross-entropy on the dataset token, and whether the student's and the teacher's top-1 tokens agree.
Chunked over tokens so evaluating long sequences with a large vocabulary stays within
``chunk_size x vocab`` floats; the sums are returned so batches and workers can be added up.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdlib.losses.divergences import kl_from_log_probs
from kdlib.models.head import LMHead


@dataclass
class HeldoutSums:
    """Additive held-out statistics."""

    kl: float = 0.0
    ce: float = 0.0
    top1_agree: float = 0.0
    tokens: int = 0

    def add(self, other: "HeldoutSums") -> "HeldoutSums":
        return HeldoutSums(
            self.kl + other.kl, self.ce + other.ce, self.top1_agree + other.top1_agree, self.tokens + other.tokens
        )

    def means(self) -> dict[str, float]:
        n = max(self.tokens, 1)
        return {
            "kl": self.kl / n,
            "ce": self.ce / n,
            "top1_agreement": self.top1_agree / n,
            "tokens": self.tokens,
        }


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
    sums = HeldoutSums(tokens=int(targets.shape[0]))
    for start in range(0, targets.shape[0], chunk_size):
        stop = start + chunk_size
        s_logits = student_head.logits(student_hidden[start:stop]).float()
        sums.ce += F.cross_entropy(s_logits, targets[start:stop], reduction="sum").item()
        if teacher_hidden is None or teacher_head is None:
            continue
        t_logits = teacher_head.logits(teacher_hidden[start:stop].to(teacher_head.weight.device)).float()
        vocab = min(s_logits.shape[-1], t_logits.shape[-1])
        s_common, t_common = s_logits[:, :vocab], t_logits[:, :vocab]
        sums.kl += kl_from_log_probs(F.log_softmax(t_common, -1), F.log_softmax(s_common, -1)).sum().item()
        sums.top1_agree += (s_common.argmax(-1) == t_common.argmax(-1)).sum().item()
    return sums
