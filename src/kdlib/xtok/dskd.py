"""``algorithm=dskd``: Dual-Space KD (Zhang et al. 2024) with exact token alignment (ETA), as in KDFlow.

DSKD compares the two models in each other's space instead of mapping vocabularies. Two linear
projectors connect the hidden spaces: t2s (teacher hidden -> student hidden) and s2t (student
hidden -> teacher hidden). At each ETA pair, i.e. each 1:1 byte-aligned group (KDFlow's ETA pairs
tokens whose text and preceding text agree, which is exactly a 1:1 group), with h_s, h_t the two
hidden states, z_s = W_s h_s the student logits and z_t = W_t h_t the teacher's:

    student space: z_t2s = W_s (P_t2s h_t)      (student head without gradient)
                   KD_s  = D(softmax(sg(z_t2s)) || softmax(z_s))   -> trains the student
                   CE_t2s = CE(z_t2s, y)                            -> trains P_t2s
    teacher space: z_s2t = W_t (P_s2t h_s)      (teacher head, constant)
                   KD_t  = D(softmax(z_t) || softmax(z_s2t))        -> trains the student and P_s2t

    KD = sum over ETA pairs of KD_s + CE_t2s + KD_t

D is a divergence of kdlib's registry; y is the pair's target token (``t2s_target=data``, the
paper) or the teacher's top-1 token mapped to the student vocabulary (``teacher_argmax``, KDFlow;
rows whose teacher top-1 has no student counterpart are left out of CE_t2s). Heads keep their
bias, logit scale and soft-cap.

Initialisation (KDFlow): on the matched sub-vocabulary M, P_t2s = pinv(W_s[M]) W_t[M] and
P_s2t = pinv(W_t[M]) W_s[M], the least-squares maps that make projected logits reproduce the
other model's logits on M; with identical heads they are the identity, so z_t2s = z_t and
z_s2t = z_s exactly. Unlike KDFlow (a frozen s2t map and a frozen copy of the student head), both
projectors are trainable :class:`DSKDProjectors` parameters and the student head is the current
one, detached; KDFlow also scores unaligned rows against a zero hidden state, kdlib skips them.
The projectors are trainable modules of the algorithm: the student worker puts them in its
optimizer (``algorithm.projector_lr``, KDFlow's ``--dskd_projector_lr``; null = train.lr), saves
and restores them with its training checkpoints, and leaves them out of the exported student. This
file holds the method whole: its config, its registered algorithm and its per-chunk term.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import Enum
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.algorithms.base import register_algorithm
from kdlib.algorithms.cross_tokenizer import CrossTokenizerAlgorithm, CrossTokenizerConfig
from kdlib.config.schema import LossConfig
from kdlib.losses.engine import IGNORE_INDEX, head_logits
from kdlib.models.head import LMHead
from kdlib.xtok.groups import RowKind
from kdlib.xtok.method import ChunkInputs, CrossTokenizerLoss, divergence
from kdlib.xtok.vocab import VocabMatch


class T2STarget(str, Enum):
    """What the projected teacher distribution is trained to predict."""

    data = "data"
    teacher_argmax = "teacher_argmax"


@dataclass
class DSKDConfig(CrossTokenizerConfig):
    """``algorithm=dskd`` and its options (the divergence itself comes from the loss config)."""

    name: str = "dskd"
    # Target of the t2s projector's CE: the data token (DSKD paper) or the teacher's top-1 token
    # mapped to the student vocabulary (KDFlow).
    t2s_target: T2STarget = T2STarget.data
    # Learning rate of the two projectors (KDFlow's --dskd_projector_lr); null = train.lr. They
    # follow the run's warmup and cosine schedule like the student's parameters.
    projector_lr: Optional[float] = None

    def check(self) -> None:
        super().check()
        if self.projector_lr is not None and self.projector_lr <= 0:
            raise ValueError(f"projector_lr must be positive or null, got {self.projector_lr}")


class DSKDProjectors(nn.Module):
    """The two hidden-space projectors DSKD trains with the student (and never exports)."""

    def __init__(self, student_hidden: int, teacher_hidden: int) -> None:
        super().__init__()
        self.t2s = nn.Linear(teacher_hidden, student_hidden, bias=False)
        self.s2t = nn.Linear(student_hidden, teacher_hidden, bias=False)

    @classmethod
    def from_heads(cls, student_head: LMHead, teacher_head: LMHead, match: VocabMatch) -> "DSKDProjectors":
        """Projectors initialised by pseudo-inverses on the matched sub-vocabulary (float64 solve)."""
        student_rows = student_head.weight.detach()[match.student_ids.to(student_head.weight.device)].double()
        teacher_rows = teacher_head.weight.detach()[match.teacher_ids.to(teacher_head.weight.device)].double()
        teacher_rows = teacher_rows.to(student_rows.device)
        module = cls(student_head.hidden_size, teacher_head.hidden_size).to(student_rows.device)
        with torch.no_grad():
            module.t2s.weight.copy_(torch.linalg.pinv(student_rows) @ teacher_rows)
            module.s2t.weight.copy_(torch.linalg.pinv(teacher_rows) @ student_rows)
        return module


class DSKDLoss(CrossTokenizerLoss):
    """Dual-space KD at ETA pairs with trainable projectors, plus CE."""

    row_kind = RowKind.pairs

    def __init__(
        self,
        teacher_head: LMHead,
        projectors: DSKDProjectors,
        loss: LossConfig,
        options: DSKDConfig = DSKDConfig(),
        *,
        match: Optional[VocabMatch] = None,
        **weights,
    ) -> None:
        super().__init__(teacher_head, **weights)
        self.projectors = projectors
        self.loss = loss
        self.options = options
        self._teacher_heads: dict[torch.dtype, LMHead] = {}
        if T2STarget(options.t2s_target) is T2STarget.teacher_argmax:
            if match is None:
                raise ValueError("dskd: t2s_target=teacher_argmax needs the vocabulary match")
            self.teacher_to_student = match.teacher_to_student(self.teacher_head.vocab_size).to(
                self.teacher_head.weight.device
            )

    def parameters(self) -> list[torch.Tensor]:
        return [self.projectors.t2s.weight, self.projectors.s2t.weight]

    def kd_sum(self, chunk: ChunkInputs) -> torch.Tensor:
        t2s, s2t = chunk.extra
        dtype = chunk.dtype
        student_logits = chunk.student_logits[chunk.student_start]
        teacher_hidden = chunk.teacher_hidden[chunk.teacher_start].to(dtype)
        teacher_logits = self.teacher_logits(chunk, chunk.teacher_start)

        frozen_student = replace(
            chunk.student_head, weight=chunk.student_head.weight.detach(),
            bias=None if chunk.student_head.bias is None else chunk.student_head.bias.detach(),
        )
        t2s_logits = head_logits(frozen_student, teacher_hidden @ t2s.to(dtype).t(), dtype)
        kd_student = divergence(self.loss, student_logits, t2s_logits.detach())
        ce_t2s = F.cross_entropy(t2s_logits, self._t2s_targets(chunk, teacher_logits), ignore_index=IGNORE_INDEX,
                                 reduction="none")

        projected = chunk.student_hidden[chunk.student_start] @ s2t.to(dtype).t()
        s2t_logits = head_logits(self._teacher_head_in(dtype), projected, dtype)
        kd_teacher = divergence(self.loss, s2t_logits, teacher_logits)
        return (kd_student + ce_t2s + kd_teacher).sum()

    def _teacher_head_in(self, dtype: torch.dtype) -> LMHead:
        """The teacher head in the loss's dtype, so gradients through it are not rounded (cached)."""
        if dtype not in self._teacher_heads:
            self._teacher_heads[dtype] = self.teacher_head.detached(dtype=dtype)
        return self._teacher_heads[dtype]

    def _t2s_targets(self, chunk: ChunkInputs, teacher_logits: torch.Tensor) -> torch.Tensor:
        if T2STarget(self.options.t2s_target) is T2STarget.data:
            return chunk.student_ids[chunk.student_start]
        mapped = self.teacher_to_student[teacher_logits.argmax(-1)]
        return mapped.masked_fill(mapped < 0, IGNORE_INDEX)


@register_algorithm("dskd", config=DSKDConfig)
class DSKD(CrossTokenizerAlgorithm):
    cfg: DSKDConfig
    loss_cls = DSKDLoss

    def build_method(self, student_head, match, weights) -> DSKDLoss:
        self.projectors = DSKDProjectors.from_heads(student_head, self.teacher_head, match)
        return DSKDLoss(self.teacher_head, self.projectors, self.loss_cfg, self.cfg, match=match, **weights)

    def modules(self) -> dict[str, nn.Module]:
        return {"dskd_projectors": self.projectors} if self.method is not None else {}

    def modules_lr(self) -> Optional[float]:
        return self.cfg.projector_lr
