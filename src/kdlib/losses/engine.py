"""The one chunked-loss engine: every KD objective, chunk by chunk, values and gradients at once.

With a 150k vocabulary the logits are the largest tensors of a KD step, and autograd over a whole
micro-batch would keep several [tokens, vocab] tensors alive. Every KD objective of kdlib (the
same-tokenizer divergences of :mod:`kdlib.losses.fused`, the cross-tokenizer methods of
:mod:`kdlib.xtok`) therefore runs through this module: one loop cuts the student's loss rows into
chunks, recomputes the chunk's student logits from its hidden states and head, adds the KD term
and the student's cross-entropy, and differentiates them at once; one ``autograd.Function`` keeps
the gradients (hidden states, head weight and bias, a term's own parameters) and only scales them
in backward. Memory is O(chunk x vocab) plus one gradient per parameter, which training needs
anyway; the parts of a mixed micro-batch share that gradient and the chunk buffers
(:mod:`kdlib.losses.shared_buffers`).

How a KD term plugs in. A :class:`Plan` names the chunks (:class:`Chunk`: student rows, the term's
units inside them, the teacher rows those units read), the student head, the CE targets, the
weights and one term. The term declares its teacher side as ``teacher``, a mapping of tensors
whose first dimension is the teacher's rows (hidden states; for later teacher signals: top-k ids
and log-probabilities, or sampled tokens and their importance weights); the engine hands each
chunk ``{name: rows[chunk.teacher]}`` and assumes nothing else about them. A term is one of two
kinds:

- :class:`LogitTerm`, the fast path: ``kd_values(s, teacher, ws, need_grad)`` receives the chunk's
  student logits ``s`` [rows, columns] (float32, float64 for float64 heads, already divided by
  the term's ``temperature``, in a buffer it may overwrite) and returns one value per row; with
  ``need_grad`` it leaves d(sum of values)/ds in ``s``, in closed form or by autograd on the
  logits alone. The engine scales values by ``value_scale`` and does CE and the backward pass
  through the head in closed form (:mod:`kdlib.losses.chunk_math`).
- :class:`AutogradTerm`, the general path: ``kd_sum(chunk, student, teacher)`` receives the
  chunk's :class:`StudentRows` (logits with autograd, hidden rows, head and the term's extra
  parameters as autograd leaves, targets) and returns the chunk's KD sum as a scalar with
  autograd; the engine differentiates it with the CE term with respect to every leaf.

A new teacher signal is a new term with its own ``teacher`` tensors, not a new engine.

A policy-gradient term (:class:`~kdlib.losses.policy_gradient.PolicyGradient`, ``Plan.pg``) is a
cross-entropy on the sampled tokens weighted per token, so the fast path adds it to its CE: the
chunk's CE gradient is computed with unit weight, the per-token weights follow from the CE values
(``log p_student(y_t) = -CE_t``) and, for on-policy distillation, the teacher's log-probabilities
of the targets, which a term writes into its ``teacher[TARGET_LOGPROB]`` rows when it has them;
then the CE gradient is scaled by ``ce_weight + w_t`` per row. Its value is returned apart
(``pg_sum = sum_t w_t CE_t``), and the total is ``kd_weight * KD + ce_weight * CE + pg_sum``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Mapping, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from kdlib.losses.chunk_math import (
    IGNORE_INDEX,
    Workspace,
    accumulate_grads,
    accumulation_dtype,
    cross_entropy,
    logits_into,
)
from kdlib.losses import shared_buffers, target_logprobs
from kdlib.losses.shared_buffers import GradientBuffers
from kdlib.losses.policy_gradient import PolicyGradient
from kdlib.models.head import LMHead

__all__ = ["AutogradTerm", "Chunk", "IGNORE_INDEX", "LogitTerm", "Plan", "StudentRows", "TARGET_LOGPROB", "evaluate",
           "even_chunks"]

# A term's teacher rows under this name (an [N] buffer, when the plan has one) receive the teacher's
# log-probability of each row's target, for the on-policy-distillation weights of a PolicyGradient.
TARGET_LOGPROB = "target_logprob"


@dataclass(frozen=True)
class Chunk:
    """Student loss ``rows``, the term's ``units`` whose student rows lie in them, and the
    ``teacher`` rows those units read (all three the same slice when tokenizers are shared)."""

    rows: slice
    units: slice
    teacher: slice


def even_chunks(n_rows: int, chunk_size: int) -> tuple[Chunk, ...]:
    """Chunks of ``chunk_size`` rows (the last one shorter), one unit and one teacher row per row."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    step = min(chunk_size, max(n_rows, 1))
    spans = (slice(start, min(start + step, n_rows)) for start in range(0, n_rows, step))
    return tuple(Chunk(rows=span, units=span, teacher=span) for span in spans)


class ChunkTerm(ABC):
    """A KD term evaluated chunk by chunk; ``teacher`` holds its row-aligned teacher tensors."""

    teacher: Mapping[str, torch.Tensor]


class LogitTerm(ChunkTerm):
    """Fast path: per-row values and their gradient with respect to the chunk's student logits."""

    # Leading student-logit columns the term reads (the common vocabulary).
    columns: int
    # Divides the student logits before ``kd_values``; the gradient is scaled back by the engine.
    temperature: float
    # Multiplies the values (T^2 or 1).
    value_scale: float

    @abstractmethod
    def kd_values(self, s: torch.Tensor, teacher: Mapping[str, torch.Tensor], ws: Workspace,
                 need_grad: bool) -> torch.Tensor:
        """Values [rows] of the chunk; with ``need_grad``, d(sum of values)/ds left in ``s``."""


@dataclass
class StudentRows:
    """A chunk's student side as an :class:`AutogradTerm` sees it (everything with autograd)."""

    logits: torch.Tensor  # [rows, Vs], untempered, float32 (float64 for float64 heads)
    hidden: torch.Tensor  # [rows, Hs], an autograd leaf
    head: LMHead  # weight and bias are autograd leaves
    extra: tuple[torch.Tensor, ...]  # the term's own parameters, as autograd leaves
    targets: Optional[torch.Tensor]  # [rows], the token each row predicts


class AutogradTerm(ChunkTerm):
    """General path: the chunk's KD sum as a scalar with autograd through :class:`StudentRows`."""

    @abstractmethod
    def kd_sum(self, chunk: Chunk, student: StudentRows, teacher: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Sum over the chunk's units of the term's KD loss."""


@dataclass(frozen=True)
class Plan:
    """One evaluation, apart from the tensors autograd tracks (hidden states, head, extras)."""

    chunks: tuple[Chunk, ...]
    # The student head: its scale and soft-cap (weight and bias are passed to evaluate as well).
    head: LMHead
    term: Optional[ChunkTerm]  # None: CE only
    targets: Optional[torch.Tensor]  # [N] next-token ids for CE (-100 ignored); None: no CE
    kd_weight: float
    ce_weight: float
    # A policy-gradient term on the targets (needs targets and a LogitTerm or no term); None: none.
    pg: Optional[PolicyGradient] = None


def evaluate(
    plan: Plan, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    extra: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(kd_weight * KD + ce_weight * CE [+ PG], KD, CE) summed over the plan's chunks; the first
    is differentiable with respect to ``hidden``, ``weight``, ``bias`` and ``extra``."""
    total, kd_sum, ce_sum, _ = evaluate_terms(plan, hidden, weight, bias, extra)
    return total, kd_sum, ce_sum


def evaluate_terms(
    plan: Plan, hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
    extra: Sequence[torch.Tensor] = (),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`evaluate` and the detached policy-gradient sum ``sum_t w_t CE_t`` (0 without one)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias, *extra)):
        return _ChunkedLoss.apply(plan, hidden, weight, bias, *extra)
    with torch.no_grad():
        nothing = GradientBuffers(hidden, (weight, bias, *extra), (False,) * (3 + len(extra)))
        total, kd_sum, ce_sum, pg_sum = _run(plan, hidden, weight, bias, tuple(extra), nothing)
    return total, kd_sum, ce_sum, pg_sum


class _ChunkedLoss(torch.autograd.Function):
    """Forward does all the work and keeps the gradients; backward scales them."""

    @staticmethod
    def forward(ctx, plan, hidden, weight, bias, *extra):
        grads = GradientBuffers(hidden, (weight, bias, *extra), tuple(ctx.needs_input_grad[1:]), shared_buffers.active())
        total, kd_sum, ce_sum, pg_sum = _run(plan, hidden, weight, bias, extra, grads)
        ctx.grads = grads.result((weight, bias, *extra))
        ctx.shared = grads.shared
        ctx.mark_non_differentiable(kd_sum, ce_sum, pg_sum)
        return total, kd_sum, ce_sum, pg_sum

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_total, _grad_kd, _grad_ce, _grad_pg):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("the chunked KD loss was already differentiated without retain_graph")
        keep = _graph_is_kept()
        if keep:  # another backward may follow (retain_graph, gradcheck): copy
            grads = [None if g is None else g * grad_total.to(g.dtype) for g in grads]
        else:
            # Last use: scale in place and hand the buffers to autograd, which adopts them as .grad
            # without a copy (so the [V, H] weight gradient exists once).
            ctx.grads = None
            for g in grads:
                if g is not None:
                    g.mul_(grad_total.to(g.dtype))
        for position, shared in ctx.shared.items():  # a head gradient shared by a mixed micro-batch's parts
            grads[position] = shared.take(grad_total, keep)
        return (None, *grads)


def _graph_is_kept() -> bool:
    """Whether the running backward pass keeps the graph (True when torch cannot say)."""
    try:
        return bool(torch._C._autograd._get_current_graph_task_keep_graph())
    except (AttributeError, RuntimeError):
        return True


# ----------------------------------------------------------------------------------------------
# The chunk loop


def _run(plan: Plan, hidden, weight, bias, extra, grads: GradientBuffers):
    """Loop over chunks: (total, kd_sum, ce_sum, pg_sum), the gradients accumulated in ``grads``."""
    params = (weight, bias, *extra)
    general = isinstance(plan.term, AutogradTerm)
    if plan.pg is not None and (general or plan.targets is None):
        raise ValueError("a policy-gradient term needs the targets and a logit term (same-tokenizer KD)")
    step = _GeneralStep(plan, hidden, params, grads) if general else _FastStep(plan, hidden, params, grads)
    teacher = {} if plan.term is None else plan.term.teacher
    for chunk in plan.chunks:
        step(chunk, {name: rows[chunk.teacher] for name, rows in teacher.items()})
    kd_sum, ce_sum = step.sums()
    total = plan.kd_weight * kd_sum + plan.ce_weight * ce_sum
    pg_sum = torch.zeros_like(ce_sum)
    if plan.pg is not None:
        pg_sum = step.pg_rows.sum()
        total = total + pg_sum
    return total, kd_sum, ce_sum, pg_sum


class _FastStep:
    """One chunk of a :class:`LogitTerm` (or CE alone): logits in reused buffers, CE and the
    term's logit gradient in closed form, backpropagated through the head by hand."""

    def __init__(self, plan: Plan, hidden, params, grads: GradientBuffers) -> None:
        weight, bias = params[0], params[1]
        self.plan, self.hidden, self.grads = plan, hidden, grads
        self.term: Optional[LogitTerm] = plan.term
        n = hidden.shape[0]
        vocab_s = weight.shape[0]
        self.has_ce = plan.targets is not None
        self.vocab = vocab_s if self.term is None else self.term.columns
        self.cols = vocab_s if self.has_ce else self.vocab  # student logits the loss reads
        self.head = replace(plan.head, weight=weight.detach()[: self.cols],
                            bias=None if bias is None else bias.detach()[: self.cols])
        acc = accumulation_dtype(weight)
        kd_grad = self.term is not None and plan.kd_weight != 0.0
        ce_grad = self.has_ce and (plan.ce_weight != 0.0 or plan.pg is not None)
        self.any_grad = any(grads.needs[:3]) and (kd_grad or ce_grad)
        self.kd_grad = kd_grad and self.any_grad
        self.ce_grad = ce_grad and self.any_grad
        self.kd_rows = torch.zeros(n, dtype=acc, device=hidden.device)
        self.ce_rows = torch.zeros(n, dtype=acc, device=hidden.device)
        self.pg_rows = torch.zeros(n, dtype=acc, device=hidden.device) if plan.pg is not None else None
        self.recorder = target_logprobs.active() if self.has_ce else None
        self.recorded = None if self.recorder is None else torch.full((n,), float("nan"), device=hidden.device)
        rows = max((c.rows.stop - c.rows.start for c in plan.chunks), default=1)
        shared = grads.sharing
        self.ws: Optional[Workspace] = (Workspace(rows, acc, hidden.device) if shared is None
                                        else shared.workspace(rows, acc, hidden.device))

    def __call__(self, chunk: Chunk, teacher: Mapping[str, torch.Tensor]) -> None:
        plan, term, ws, head = self.plan, self.term, self.ws, self.head
        rows, cols = chunk.rows.stop - chunk.rows.start, self.cols
        h = self.hidden[chunk.rows].detach().to(head.weight.dtype)
        tanh = ws.get("tanh", rows, cols) if (head.softcap is not None and self.any_grad) else None
        z = logits_into(h, head, ws.get("z", rows, cols), tanh)

        dz = None  # gradient of the chunk's contribution to the total w.r.t. z
        if self.has_ce:
            targets = plan.targets[chunk.rows]
            tempered = self.recorder is not None and self.recorder.temperature != 1.0
            if tempered:  # before the CE gradient may overwrite z
                self.recorded[chunk.rows] = target_logprobs.tempered_target_logprobs(z, targets, self.recorder.temperature)
            ce_out = None
            if self.ce_grad:
                ce_out = z if term is None else ws.get("ce", rows, cols)
            ce_weight = 1.0 if plan.pg is not None else plan.ce_weight  # PG: scaled per row below
            self.ce_rows[chunk.rows] = cross_entropy(z, targets, ce_out, ce_weight, ws)
            if self.recorder is not None and not tempered:
                self.recorded[chunk.rows] = target_logprobs.from_cross_entropy(self.ce_rows[chunk.rows], targets)
            dz = ce_out
        if term is not None:
            s = z[:, : self.vocab]  # a view: rows are strided when the student vocab is larger
            if term.temperature != 1.0:
                s.div_(term.temperature)
            values = term.kd_values(s, teacher, ws, self.kd_grad)
            self.kd_rows[chunk.rows] = values if term.value_scale == 1.0 else values * term.value_scale
        if plan.pg is not None:
            self._policy_gradient(chunk, teacher, dz)
        if term is not None:
            if self.kd_grad:
                alpha = plan.kd_weight * term.value_scale / term.temperature
                if dz is None:
                    s.mul_(alpha)
                    if cols > self.vocab:  # student logits beyond the teacher's: CE without grad
                        z[:, self.vocab :].zero_()
                    dz = z
                else:
                    dz[:, : self.vocab].add_(s, alpha=alpha)
        if dz is None:
            return
        if tanh is not None:  # d softcap * tanh(x / softcap) / dx = 1 - tanh^2
            dz.mul_(tanh.square_().neg_().add_(1.0))
        if head.logit_scale != 1.0:
            dz.mul_(head.logit_scale)
        grad_w, grad_b = self.grads.params[0], self.grads.params[1]
        accumulate_grads(dz, h, head.weight, chunk.rows, self.grads.hidden, grad_w, grad_b)

    def _policy_gradient(self, chunk: Chunk, teacher: Mapping[str, torch.Tensor], dz: Optional[torch.Tensor]) -> None:
        """The chunk's PG weights from its CE values (and the teacher's target log-probabilities);
        its value into ``pg_rows``; the unit-weight CE gradient in ``dz`` scaled to ce_weight + w."""
        ce = self.ce_rows[chunk.rows]
        w = self.plan.pg.weights(chunk.rows, -ce, teacher.get(TARGET_LOGPROB))
        self.pg_rows[chunk.rows] = w * ce
        if dz is not None:
            dz.mul_((w + self.plan.ce_weight).unsqueeze(-1))

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        self.ws = None  # free the chunk buffers before the final casts
        if self.recorder is not None:
            self.recorder.evaluations.append(self.recorded)
        return self.kd_rows.sum(), self.ce_rows.sum()


class _GeneralStep:
    """One chunk of an :class:`AutogradTerm`: autograd from the chunk's leaves (hidden rows, head
    weight and bias, the term's parameters) through the logits, CE and the term's KD sum."""

    def __init__(self, plan: Plan, hidden, params, grads: GradientBuffers) -> None:
        self.plan, self.hidden, self.params, self.needs, self.grads = plan, hidden, params, grads.needs, grads
        acc = accumulation_dtype(params[0])
        self.kd = torch.zeros((), dtype=acc, device=hidden.device)
        self.ce = torch.zeros((), dtype=acc, device=hidden.device)
        self.recorder = target_logprobs.active() if plan.targets is not None else None
        self.recorded: list[torch.Tensor] = []

    def __call__(self, chunk: Chunk, teacher: Mapping[str, torch.Tensor]) -> None:
        plan, needs = self.plan, self.needs
        h = self.hidden[chunk.rows].detach().requires_grad_(needs[0])
        leaves = [None if p is None else p.detach().requires_grad_(bool(n)) for p, n in zip(self.params, needs[1:])]
        targets = None if plan.targets is None else plan.targets[chunk.rows]
        with torch.enable_grad():
            head = replace(plan.head, weight=leaves[0], bias=leaves[1])
            logits = head_logits(head, h, accumulation_dtype(leaves[0]))
            if targets is None:
                ce = logits.new_zeros(())
            else:
                ce = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
            if self.recorder is not None:
                self.recorded.append(target_logprobs.tempered_target_logprobs(logits, targets, self.recorder.temperature))
            student = StudentRows(logits=logits, hidden=h, head=head, extra=tuple(leaves[2:]), targets=targets)
            kd = plan.term.kd_sum(chunk, student, teacher)
            total = plan.kd_weight * kd + plan.ce_weight * ce
        self.kd += kd.detach().to(self.kd.dtype)
        self.ce += ce.detach().to(self.ce.dtype)
        wanted = [t for t, n in zip([h, *leaves], needs) if n and t is not None]
        if not wanted or not total.requires_grad:
            return
        found = iter(torch.autograd.grad(total, wanted, allow_unused=True))
        if needs[0]:
            g = next(found)
            if g is not None:
                self.grads.hidden[chunk.rows] = g
        for buffer, leaf, n in zip(self.grads.params, leaves, needs[1:]):
            if not n or leaf is None:
                continue
            g = next(found)
            if g is not None:
                buffer.add_(g.to(buffer.dtype))

    def sums(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.recorder is not None and self.recorded:
            self.recorder.evaluations.append(torch.cat(self.recorded))
        return self.kd, self.ce


def head_logits(head: LMHead, hidden: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``head(hidden)`` in the head's dtype (as the model computes it), returned in ``dtype``."""
    return head.logits(hidden).to(dtype)
