"""An ensemble of teachers as one KD target: their distributions combined on the student's vocabulary.

Member k of an ensemble gives, at a student loss row r where it predicts from the same text prefix
as the student, a distribution P_k(r) over the student's vocabulary: its own next-token
distribution when it shares the student's tokenizer (every row), or that distribution carried onto
the student's tokens (``algorithm=marginal``'s map: each teacher token's probability goes to the
student token its text starts with) at the first student row of each byte-aligned group of its
own alignment. With the sample's weights w_k (summing to 1), the members that cover row r, K(r),
and their weights renormalised over K(r), v_k = w_k / sum_{j in K(r)} w_j:

    mixture:  P(r) = sum_{k in K(r)} v_k P_k(r)
    product:  P(r) = prod_{k in K(r)} P_k(r)^(v_k) / Z(r)        (log-linear, a product of experts)

and the KD term is the configured divergence D(P(r) || Q(r)) summed over the rows some member with
a positive weight covers (a row no such member covers gets CE only). A row whose weight is all on
one member uses that member's logits as they are, so weights (1, 0) give exactly that member's
one-teacher loss. docs/multi_teacher.md has the cases where the members' groupings differ.

:class:`EnsembleDivergence` is a fast-path term of :mod:`kdlib.losses.engine`: per chunk it
recomputes each member's logits from its hidden states (placed at the student rows it covers) and
head, combines them, and hands the combined target to the divergence's closed-form (or autograd)
kernel, exactly as :class:`~kdlib.losses.fused.HiddenStateDivergence` does for one teacher.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch
import torch.nn.functional as F

from kdlib.config.schema import LossConfig
from kdlib.losses.chunk_math import Workspace, log_probs_, teacher_logits_into
from kdlib.losses.engine import LogitTerm, Plan, evaluate, even_chunks
from kdlib.losses.fused import Kernel, kernel_for, spec_of
from kdlib.losses.terms import LossTerms
from kdlib.models.head import LMHead

# Tempered teacher logits [rows, Vt] -> log-probabilities [rows, columns] on the student's vocabulary.
Carry = Callable[[torch.Tensor, int], torch.Tensor]


def combine_log_probs(log_probs: Sequence[torch.Tensor], weights: torch.Tensor, combine: str) -> torch.Tensor:
    """The log of the combined target per row (up to a constant per row for ``product``, which
    the divergence's softmax removes): ``log_probs[k]`` [rows, V] of member k, ``weights`` [rows, K]
    (rows sum to 1; a zero weight leaves its member out, -inf entries included)."""
    stacked = torch.stack(list(log_probs))  # [K, rows, V]
    w = weights.t().unsqueeze(-1).to(stacked.dtype)  # [K, rows, 1]
    present = w > 0
    if combine == "mixture":
        terms = torch.where(present, stacked + torch.log(torch.where(present, w, torch.ones_like(w))),
                            torch.full_like(stacked, float("-inf")))
        return torch.logsumexp(terms, dim=0)
    if combine == "product":
        return torch.where(present, w * stacked, torch.zeros_like(stacked)).sum(0)
    raise ValueError(f"unknown ensemble combination {combine!r}: mixture or product")


def row_weights(sample_weights: torch.Tensor, rows_per_sample: torch.Tensor, covered: torch.Tensor) -> torch.Tensor:
    """[rows, K] weights of the members at each student row: the sample's weights, kept where the
    member covers the row (``covered`` [rows, K] bool), renormalised to sum 1 (0 where none does)."""
    rows = torch.repeat_interleave(sample_weights.double(), rows_per_sample.to(sample_weights.device), dim=0)
    rows = rows * covered.to(rows.dtype)
    total = rows.sum(-1, keepdim=True)
    return torch.where(total > 0, rows / torch.where(total > 0, total, torch.ones_like(total)), torch.zeros_like(rows))


@dataclass(frozen=True)
class Member:
    """One member as the loss sees it: its head (constant) and how its distribution reaches the
    student's vocabulary (None: the identity on the first ``columns`` entries, where its head is
    cut to those entries)."""

    head: LMHead
    carry: Optional[Carry] = None


@dataclass(frozen=True)
class EnsembleDivergence(LogitTerm):
    """The divergence between the members' combined target and the student, per student row."""

    # {"weights": [N, K] row weights, f"hidden.{k}": [N, Ht_k] member k's hidden states at the
    # student rows it covers (anything elsewhere)}, constant.
    teacher: Mapping[str, torch.Tensor]
    members: tuple[Member, ...]
    combine: str
    kernel: Kernel
    params: dict
    columns: int
    temperature: float
    value_scale: float

    def kd_values(self, s, teacher, ws: Workspace, need_grad: bool) -> torch.Tensor:
        weights = teacher["weights"]
        rows = s.shape[0]
        active = [k for k in range(len(self.members)) if bool((weights[:, k] > 0).any())]
        covered = weights.sum(-1) > 0
        direct = {k: self._member_target(k, teacher, ws, rows) for k in active}
        whole = [k for k in active if bool((weights[:, k] == 1).all())]
        if whole:  # every row on one member: its own logits, exactly as a one-teacher run
            target = direct[whole[0]]
        else:
            log_probs = [self._log_probs(k, direct[k]) if k in direct else None for k in range(len(self.members))]
            filler = s.new_zeros(rows, self.columns)
            target = combine_log_probs([lp if lp is not None else filler for lp in log_probs], weights, self.combine)
            for k in active:
                target = torch.where((weights[:, k] == 1).unsqueeze(-1), direct[k], target)
            target = torch.where(covered.unsqueeze(-1), target, s)  # uncovered rows: masked below
        # the kernels take the teacher's log-probabilities, normalised exactly as one teacher's are
        log_probs_(target, ws.get("p", rows, self.columns))
        values = self.kernel(s, target, ws, need_grad, **self.params)
        if not bool(covered.all()):
            values = values.masked_fill(~covered, 0.0)
            if need_grad:
                s.masked_fill_(~covered.unsqueeze(-1), 0.0)
        return values

    def _member_target(self, k: int, teacher, ws: Workspace, rows: int) -> torch.Tensor:
        """Member k's tempered logits (identity) or carried log-probabilities, [rows, columns]."""
        member = self.members[k]
        t = teacher_logits_into(teacher[f"hidden.{k}"], member.head, ws.get(f"t{k}", rows, member.head.vocab_size),
                                self.temperature)
        return t if member.carry is None else member.carry(t, self.columns)

    def _log_probs(self, k: int, target: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(target, -1) if self.members[k].carry is None else target


def ensemble_loss(
    student_hidden: torch.Tensor, student_head: LMHead, targets: Optional[torch.Tensor], members: Sequence[Member],
    member_hidden: Sequence[torch.Tensor], weights: torch.Tensor, combine: str, cfg: LossConfig, *,
    kd_weight: float, ce_weight: float, normaliser: float,
) -> LossTerms:
    """``(kd_weight * KD + ce_weight * CE) / normaliser`` with the ensemble's KD (module docstring);
    ``member_hidden[k]`` [N, Ht_k] are member k's hidden states at the student's N loss rows,
    ``weights`` [N, K] the row weights of :func:`row_weights`."""
    n = student_hidden.shape[0]
    spec = spec_of(cfg)
    identity = [m.carry is None for m in members]
    if any(identity) and not all(identity):
        raise ValueError("an ensemble's members are all on the student's tokens or all carried onto them")
    columns = min([student_head.vocab_size, *(m.head.vocab_size for m in members)]) if all(identity) \
        else student_head.vocab_size
    if all(identity):
        members = [Member(LMHead(m.head.weight[:columns], None if m.head.bias is None else m.head.bias[:columns],
                                 m.head.logit_scale, m.head.softcap)) for m in members]
    teacher = {"weights": weights.to(student_hidden.device)}
    for k, hidden in enumerate(member_hidden):
        if hidden.shape[0] != n:
            raise ValueError(f"ensemble member {k}: hidden states for {hidden.shape[0]} rows, the student has {n}")
        teacher[f"hidden.{k}"] = hidden.detach()
    term = EnsembleDivergence(
        teacher=teacher, members=tuple(members), combine=combine, kernel=kernel_for(spec.name, spec.params, spec.closed_form),
        params=spec.params, columns=columns, temperature=float(spec.temperature),
        value_scale=spec.temperature**2 if spec.scale_by_temperature_squared else 1.0,
    )
    plan = Plan(chunks=even_chunks(n, int(spec.chunk_size)), head=student_head, term=term,
                targets=None if targets is None else targets.reshape(-1).long(),
                kd_weight=float(kd_weight), ce_weight=float(ce_weight))
    with torch.autocast(student_hidden.device.type, enabled=False):  # the loss is never autocast
        total, kd_sum, ce_sum = evaluate(plan, student_hidden, student_head.weight, student_head.bias)
    return LossTerms(loss=total / normaliser, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=n)
