"""KD + CE from a sparse teacher signal (top-k or sampled tokens) on the one chunked-loss engine.

A top-k or sampled signal gives the teacher's log-probabilities at a few tokens per position, not
its hidden state; the student's side is unchanged (its full-vocabulary log-softmax, one chunk of
rows at a time, never ``[tokens, vocab]``). Each signal is a fast-path term of
:mod:`kdlib.losses.engine` evaluating the estimator of :mod:`kdlib.losses.estimators` per chunk:

- :class:`TopKDivergence`: the divergence of the k + 1 buckets (the top k and the rest), its value
  and its gradient with respect to the bucket log-probabilities by autograd on the registered
  formula (k + 1 columns: cheap), carried back to the vocabulary in closed form (a top-k token
  gets its bucket's gradient, every other token g_rest * q_v / q_rest). A ranked loss (top1_ce,
  hrl), and any loss when the k tokens cover the whole vocabulary, runs the dense kernel of the
  hidden-state path on the teacher's log-probabilities instead, so a top-k signal of the whole
  vocabulary gives the hidden-state path's values and gradients bit for bit.
- :class:`SampledDivergence`: the importance-weighted sum over the draws of the divergence's
  integrand, gradient sum_j g_j (onehot(x_j) - q) with g_j its derivative at each draw.

The naive implementation (``loss.implementation=naive``) evaluates the reference formulas on the
micro-batch's full logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F

from kdlib.config.schema import LossConfig, LossImplementation
from kdlib.losses.chunk_math import Workspace, log_probs_
from kdlib.losses.engine import LogitTerm, Plan, evaluate, even_chunks
from kdlib.losses.estimators import (
    INTEGRANDS, RANKED, bucket_log_probs, ranked_teacher, sampled_estimate, sampled_weights, signal_support,
    topk_estimate,
)
from kdlib.losses.fused import Kernel, kernel_for
from kdlib.losses import target_logprobs
from kdlib.losses.registry import LOSSES, loss_params
from kdlib.losses.terms import LossTerms
from kdlib.models.head import LMHead
from kdlib.teacher_output import TeacherOutput


@dataclass(frozen=True)
class TopKDivergence(LogitTerm):
    """A registered divergence estimated from the teacher's top k per row (see the module doc)."""

    teacher: Mapping[str, torch.Tensor]  # {"ids": [N, k], "logprobs": [N, k], "tail"?: [N]}
    loss: str
    params: dict
    dense: Optional[Kernel]  # the hidden-state path's kernel: ranked losses, whole-vocabulary top k
    columns: int
    temperature: float = 1.0
    value_scale: float = 1.0

    def kd_values(self, s, teacher, ws: Workspace, need_grad: bool) -> torch.Tensor:
        ids, lp, tail = teacher["ids"].long(), teacher["logprobs"], teacher.get("tail")
        rows, k = ids.shape
        if k == self.columns or self.loss not in INTEGRANDS:
            t = ws.get("t", rows, self.columns)
            if k == self.columns:  # a permutation of the vocabulary: the teacher's log-probabilities
                t.scatter_(1, ids, lp.to(t.dtype))
            else:
                t.copy_(ranked_teacher(lp.to(t.dtype), ids, self.columns, tail))
            return self.dense(s, t, ws, need_grad, **self.params)
        log_probs_(s, ws.get("m", rows, self.columns))  # s <- log q
        lq_top = s.gather(1, ids)
        rest = ws.get("m", rows, self.columns)
        rest.copy_(s).scatter_(1, ids, float("-inf"))
        peak = rest.amax(-1, keepdim=True)
        lq_rest = peak + rest.sub_(peak).exp_().sum(-1, keepdim=True).log_()
        lp_b = _teacher_buckets(lp.to(s.dtype), None if tail is None else tail.to(s.dtype))
        with torch.enable_grad():
            z = torch.cat([lq_top, lq_rest], -1).requires_grad_(need_grad)
            values = LOSSES.get(self.loss)(z, lp_b, **self.params)
            grad = torch.autograd.grad(values.sum(), z)[0] if need_grad else None
        if need_grad:  # top-k token: its bucket's gradient; any other: g_rest * q_v / q_rest
            s.sub_(lq_rest).exp_().mul_(grad[:, k:])
            s.scatter_(1, ids, grad[:, :k])
        return values.detach()


def _teacher_buckets(lp: torch.Tensor, tail: Optional[torch.Tensor]) -> torch.Tensor:
    if tail is None:
        return torch.cat([lp - torch.logsumexp(lp, -1, keepdim=True), torch.full_like(lp[:, :1], float("-inf"))], -1)
    return torch.cat([lp, tail.unsqueeze(-1)], -1)


@dataclass(frozen=True)
class SampledDivergence(LogitTerm):
    """A registered divergence estimated from k draws per row by importance sampling."""

    teacher: Mapping[str, torch.Tensor]  # {"ids": [N, k], "logprobs": [N, k], "proposal"?: [N, k]}
    loss: str
    params: dict
    columns: int
    temperature: float = 1.0
    value_scale: float = 1.0

    def kd_values(self, s, teacher, ws: Workspace, need_grad: bool) -> torch.Tensor:
        ids, lp, proposal = teacher["ids"].long(), teacher["logprobs"].to(s.dtype), teacher.get("proposal")
        log_probs_(s, ws.get("m", s.shape[0], self.columns))  # s <- log q
        weights = sampled_weights(lp, None if proposal is None else proposal.to(s.dtype))
        with torch.enable_grad():
            b = s.gather(1, ids).requires_grad_(need_grad)
            values = (weights * INTEGRANDS[self.loss](lp, b, **self.params)).sum(-1)
            grad = torch.autograd.grad(values.sum(), b)[0] if need_grad else None
        if need_grad:  # sum_j g_j (onehot(x_j) - q)
            s.exp_().mul_(-grad.sum(-1, keepdim=True))
            s.scatter_add_(1, ids, grad)
        return values.detach()


# ----------------------------------------------------------------------------------------------
# The entry point the algorithms call


def signal_distillation_loss(
    student_hidden: torch.Tensor,
    student_head: LMHead,
    teacher: TeacherOutput,
    targets: Optional[torch.Tensor],
    cfg: LossConfig,
    *,
    kd_weight: float,
    ce_weight: float,
    normaliser: float,
) -> LossTerms:
    """``(kd_weight * KD + ce_weight * CE) / normaliser`` with KD estimated from ``teacher``'s
    top-k or sampled signal (its rows aligned with ``student_hidden``'s)."""
    kind = teacher.signal
    n = student_hidden.shape[0]
    teacher.check_rows(n)
    fields = _signal_tensors(teacher)
    params = loss_params(cfg)
    why = signal_support(cfg.name, kind, params, fields["ids"].shape[1])
    if why:
        raise ValueError(f"loss={cfg.name} cannot use teacher.signal={kind}: {why}")
    if cfg.temperature != 1.0:
        raise ValueError(f"teacher.signal={kind} carries log-probabilities at temperature 1; loss.temperature="
                         f"{cfg.temperature:g} needs teacher.signal=hidden")
    vocab = student_head.vocab_size
    if (kind == "topk" and fields["ids"].shape[1] > vocab) or (n and int(fields["ids"].long().max()) >= vocab):
        raise ValueError(f"teacher.signal={kind}: token ids beyond the student's vocabulary of {vocab}")
    if cfg.implementation is LossImplementation.naive:
        return _naive(student_hidden, student_head, kind, fields, targets, cfg, params,
                      kd_weight=kd_weight, ce_weight=ce_weight, normaliser=normaliser)
    if kind == "topk":
        dense = kernel_for(cfg.name, params, True) if (fields["ids"].shape[1] == vocab or cfg.name not in INTEGRANDS) else None
        term = TopKDivergence(teacher=fields, loss=cfg.name, params=params, dense=dense, columns=vocab)
    else:
        term = SampledDivergence(teacher=fields, loss=cfg.name, params=params, columns=vocab)
    if targets is not None:
        targets = targets.reshape(-1).long()
    plan = Plan(chunks=even_chunks(n, int(cfg.chunk_size)), head=student_head, term=term, targets=targets,
                kd_weight=float(kd_weight), ce_weight=float(ce_weight))
    total, kd_sum, ce_sum = evaluate(plan, student_hidden, student_head.weight, student_head.bias)
    return LossTerms(loss=total / normaliser, kd_sum=kd_sum, ce_sum=ce_sum, n_tokens=n)


def _signal_tensors(teacher: TeacherOutput) -> dict[str, torch.Tensor]:
    """The engine's teacher rows of a sparse signal: ids, log-probabilities, tail / proposal."""
    if teacher.signal == "topk":
        out = {"ids": teacher.topk_ids, "logprobs": teacher.topk_logprobs, "tail": teacher.topk_tail}
    elif teacher.signal == "sampled":
        out = {"ids": teacher.sampled_ids, "logprobs": teacher.sampled_logprobs, "proposal": teacher.sampled_proposal}
    else:
        raise ValueError(f"teacher signal {teacher.signal!r} is not a sparse signal")
    return {name: value for name, value in out.items() if value is not None}


def _naive(student_hidden, student_head: LMHead, kind: str, fields, targets, cfg: LossConfig, params, *,
           kd_weight: float, ce_weight: float, normaliser: float) -> LossTerms:
    """Reference path: the micro-batch's full student logits, then the estimator's formula."""
    logits = student_head.logits(student_hidden)
    if logits.dtype != torch.float64:  # float32 softmax whatever the input; float64 stays float64
        logits = logits.float()
    if kind == "topk":
        per_row = topk_estimate(cfg.name, logits, fields["ids"], fields["logprobs"], fields.get("tail"), **params)
    else:
        per_row = sampled_estimate(cfg.name, logits, fields["ids"], fields["logprobs"], fields.get("proposal"), **params)
    kd = per_row.sum()
    loss = kd_weight * kd
    ce = logits.new_zeros(())
    if targets is not None:
        target_logprobs.observe_logits(logits, targets)
        ce = F.cross_entropy(logits, targets.reshape(-1).long(), reduction="sum")
        loss = loss + ce_weight * ce
    return LossTerms(loss=loss / normaliser, kd_sum=kd.detach(), ce_sum=ce.detach(), n_tokens=student_hidden.shape[0])


__all__ = ["RANKED", "SampledDivergence", "TopKDivergence", "bucket_log_probs", "signal_distillation_loss"]
